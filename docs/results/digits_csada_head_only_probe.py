"""Probe (not a CLI command), session 9: digits experiment (baseline,bayes,csada) with an alternative CSADA grid, over cost draws.

python docs/results/digits_csada_head_only_probe.py VARIANT SEED_OFFSET COST_SEED_OFFSET OUT.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from models.experiment_report import format_report, to_json
from models.experiment_setups import GridPoint, recipe_for
from models.experiments import ExperimentConfig, run_experiment

L2 = {"eps": 2.0, "steps": 10, "step_size": 0.4, "norm": "l2", "tau": 1.0, "stochastic": False}


def grid(name: str) -> tuple[GridPoint, ...]:
    if name == "recipe":
        return recipe_for("digits").grid("csada")
    if name == "head":
        return tuple(GridPoint(options={**L2, "lam": lam}, train={"lr": lr, "epochs": 20, "head_only_epochs": 20})
                     for lr in (1e-3, 1e-2) for lam in (1.0, 3.0))
    raise SystemExit(f"unknown variant {name}")


def main() -> None:
    variant, seed_offset, cost_offset, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    base = recipe_for("digits")
    recipe = replace(base, grids={**base.grids, "csada": grid(variant)})
    config = ExperimentConfig(dataset="digits", methods=("baseline", "bayes", "csada"), seeds=3,
                              seed_offset=seed_offset, cost_seed_offset=cost_offset, device="cpu")
    result = run_experiment(config, recipe=recipe)
    print(format_report(result))
    out.write_text(json.dumps(to_json(result), indent=1))


if __name__ == "__main__":
    main()
