"""Probe (not a CLI command), session 9 on one H100: CSADA variants on the synthetic-pills recipe's baselines; valid AND test figures.

python docs/results/gpu-h100/csada-variants/csada_variants_probe.py --seed S --variants a,b --cache DIR --bases DIR --out OUT.json [--device cuda]
Baselines are trained once per seed (saved under --bases as seed{S}.pt) and reused.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.evaluate import bayes_decision, confusion_matrix, predictions_from_outputs
from models.experiment_setups import GridPoint, default_cost_matrix, load_splits, recipe_for
from models.experiments import _Evaluator, _finetune, _report, _train_baseline
from models.networks import create_model
from models.pmi import PMI_EXPERT_COSTS
from models.runtime import seed_everything, select_device, set_cpu_threads

BASE = {"lam": 2.0, "eps": 0.3, "steps": 10, "step_size": 0.075, "norm": "linf", "sign": True, "tau": 3.0}


def v(options=None, **train):
    return GridPoint(options={**BASE, **(options or {})}, train=train)


VARIANTS = {
    "recipe3e7": v(lr=3e-7),
    "recipe1e6": v(lr=1e-6),
    "p4_3e7": v({"pairs_per_step": 4}, lr=3e-7),
    "p4_1e6": v({"pairs_per_step": 4}, lr=1e-6),
    "lam10_3e7": v({"lam": 10.0}, lr=3e-7),
    "ep15_3e7": v(lr=3e-7, epochs=15),
    "head_1e4": v(lr=1e-4, head_only_epochs=5),
    "head_3e5": v(lr=3e-5, head_only_epochs=5),
    "head_1e3": v(lr=1e-3, head_only_epochs=5),
    "head_1e2": v(lr=1e-2, head_only_epochs=5),
    "head_p4_1e3": v({"pairs_per_step": 4}, lr=1e-3, head_only_epochs=5),
    "head_lam10_1e3": v({"lam": 10.0}, lr=1e-3, head_only_epochs=5),
    "head_sgd_1e2": v(lr=1e-2, head_only_epochs=5, optimizer="sgd"),
    "head_sgd_1e1": v(lr=1e-1, head_only_epochs=5, optimizer="sgd"),
    "head_sgd_3e2": v(lr=3e-2, head_only_epochs=5, optimizer="sgd"),
    "head_sgd_3e1": v(lr=3e-1, head_only_epochs=5, optimizer="sgd"),
    "head_sgd_3e3": v(lr=3e-3, head_only_epochs=5, optimizer="sgd"),
    "e03_1e5": v({"eps": 0.03, "step_size": 0.0075}, lr=1e-5),
    "e03_1e6": v({"eps": 0.03, "step_size": 0.0075}, lr=1e-6),
    "e1_1e5": v({"eps": 0.1, "step_size": 0.025}, lr=1e-5),
    "e1_1e6": v({"eps": 0.1, "step_size": 0.025}, lr=1e-6),
    "e03_head_1e4": v({"eps": 0.03, "step_size": 0.0075}, lr=1e-4, head_only_epochs=5),
    "e1_head_1e4": v({"eps": 0.1, "step_size": 0.025}, lr=1e-4, head_only_epochs=5),
    "e1_head_1e3": v({"eps": 0.1, "step_size": 0.025}, lr=1e-3, head_only_epochs=5),
    "ce_head_1e3": GridPoint(options={}, train={"lr": 1e-3, "head_only_epochs": 5}),
    "ce_3e7": GridPoint(options={}, train={"lr": 3e-7}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--variants", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--bases", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    set_cpu_threads(1)
    device = select_device(a.device)
    recipe = recipe_for("synthetic-pills")
    splits = load_splits(recipe, seed=a.seed, data_dir=None, cache_dir=a.cache)
    a.bases.mkdir(parents=True, exist_ok=True)
    base_path = a.bases / f"seed{a.seed}.pt"
    started = time.monotonic()
    if base_path.exists():
        seed_everything(a.seed)
        base = create_model(recipe.arch, splits.num_classes, in_channels=splits.in_channels)
        base.load_state_dict(torch.load(base_path, map_location="cpu"))
        base.to(device)
        info = {"loaded": True}
    else:
        base, info = _train_baseline(recipe, splits, seed=a.seed, device=device, pretrained=None)
        torch.save({k: t.detach().cpu() for k, t in base.state_dict().items()}, base_path)
    cm = default_cost_matrix("synthetic-pills", tuple(splits.classes), cost_seed=0)
    ev = _Evaluator(splits, device=device, batch_size=512)
    classes = list(splits.classes)
    crit = [(classes.index(t), classes.index(z)) for t, z in PMI_EXPERT_COSTS]

    def summary(pred, labels):
        r = _report(pred, labels, cm)
        conf = confusion_matrix(labels, pred, len(classes))
        return {"acc": round(100 * r["accuracy"], 3), "cost": r["total_cost"],
                "crit": int(sum(conf[i, j] for i, j in crit)), "per_pair": [int(conf[i, j]) for i, j in crit]}

    res = {"seed": a.seed, "device": str(device), "base_info": info, "rows": {}}
    for split in ("valid", "test"):
        out, lab = ev.outputs(base, split)
        res["rows"].setdefault("BASE", {})[split] = summary(out.argmax(1), lab)
        probs = torch.softmax(out, 1)
        res["rows"].setdefault("BAYES", {})[split] = summary(torch.as_tensor(bayes_decision(probs, cm)), lab)
    res["base_time_s"] = time.monotonic() - started
    a.out.write_text(json.dumps(res, indent=1))
    for name in a.variants.split(","):
        point = VARIANTS[name]
        t0 = time.monotonic()
        method = "csada" if point.options else "baseline"
        model, kind, finfo = _finetune(method, point, base=base, recipe=recipe, splits=splits, cost_matrix=cm,
                                       seed=a.seed, device=device)
        row = {"time_s": round(time.monotonic() - t0, 1), "asr": finfo.get("attack_success_rate")}
        for split in ("valid", "test"):
            out, lab = ev.outputs(model, split)
            row[split] = summary(predictions_from_outputs(out, kind), lab)
        res["rows"][name] = row
        a.out.write_text(json.dumps(res, indent=1))
        print(a.seed, name, row, flush=True)


if __name__ == "__main__":
    main()
