"""Tables and JSON of `rxverify experiment` (the layout of the paper's Tables 3-6)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.costs import CostMatrix
from models.experiments import ExperimentResult, MethodRun

# A fixed matrix with at most this many pairs above its median cost gets one table row per pair.
MAX_NAMED_PAIRS = 6
TOP_PAIRS = 3


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def highlighted_pairs(cost_matrix: CostMatrix) -> list[tuple[str, str, float]] | None:
    """The pairs to name in the table: those above the median cost, when there are few; else None."""
    costs = [c for _, _, c in cost_matrix.entries()]
    median = float(np.median(costs)) if costs else 0.0
    above = [(t, p, c) for t, p, c in cost_matrix.entries() if c > median]
    if not above or len(above) > MAX_NAMED_PAIRS:
        return None
    return sorted(above, key=lambda e: (-e[2], e[0], e[1]))


def _pair_cell(run: MethodRun, true: str, predicted: str) -> tuple[int, float]:
    for pair in run.test["pair_errors"]:
        if pair["true"] == true and pair["predicted"] == predicted:
            return int(pair["errors"]), float(pair["rate"])
    return 0, 0.0


def critical_errors(run: MethodRun, pairs: set[tuple[str, str]]) -> int:
    """Test errors summed over the given (true, predicted) pairs (the named, costly pairs)."""
    return sum(int(e["errors"]) for e in run.test["pair_errors"] if (e["true"], e["predicted"]) in pairs)


def _critical_set(result: ExperimentResult) -> set[tuple[str, str]] | None:
    """The named pairs of a cost matrix fixed across seeds, when there are several; else None."""
    seeds = result.seeds
    if not seeds or any(s.cost_matrix != seeds[0].cost_matrix for s in seeds):
        return None
    named = highlighted_pairs(seeds[0].cost_matrix)
    return {(t, p) for t, p, _ in named} if named is not None and len(named) > 1 else None


def _top_pair_rate(run: MethodRun, cost_matrix: CostMatrix, rank: int) -> float:
    true, predicted, _ = sorted(cost_matrix.entries(), key=lambda e: (-e[2], e[0], e[1]))[rank]
    return _pair_cell(run, true, predicted)[1]


def _fmt(values: Sequence[float], *, digits: int, single: bool) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if single else f"{mean:.{digits}f}({std:.{digits}f})"


def table_rows(result: ExperimentResult) -> list[tuple[str, list[str]]]:
    """(row label, one cell per method) in the paper's layout: mean(std) over seeds."""
    methods = list(result.config.methods)
    seeds = result.seeds
    single = len(seeds) == 1

    def per_method(value: Any, digits: int) -> list[str]:
        return [_fmt([value(s.runs[m], s) for s in seeds], digits=digits, single=single) for m in methods]

    rows: list[tuple[str, list[str]]] = [
        ("WER (%)", per_method(lambda r, s: 100 * r.test["wer"], 2)),
        ("Total cost", per_method(lambda r, s: r.test["total_cost"], 1)),
    ]
    base = [s.runs["baseline"].test["total_cost"] for s in seeds] if "baseline" in methods else None
    if base is not None and statistics.fmean(base) > 0:
        base_mean = statistics.fmean(base)
        rows.append(("Cost / baseline (means)",
                     [f"{statistics.fmean(s.runs[m].test['total_cost'] for s in seeds) / base_mean:.2f}"
                      for m in methods]))
    fixed = all(s.cost_matrix == seeds[0].cost_matrix for s in seeds)
    named = highlighted_pairs(seeds[0].cost_matrix) if fixed else None
    if named is not None:
        for true, predicted, cost in named:
            rows.append((f"{true}->{predicted} (c={cost:g}) errors",
                         per_method(lambda r, s, t=true, p=predicted: _pair_cell(r, t, p)[0], 1)))
        named_set = {(t, p) for t, p, _ in named}
        if len(named) > 1:
            rows.append(("Critical pairs errors (sum)", per_method(lambda r, s: critical_errors(r, named_set), 1)))
            if base is not None:
                base_critical = statistics.fmean(critical_errors(s.runs["baseline"], named_set) for s in seeds)
                if base_critical > 0:
                    rows.append(("Critical errors / baseline (means)", [
                        f"{statistics.fmean(critical_errors(s.runs[m], named_set) for s in seeds) / base_critical:.2f}"
                        for m in methods]))
        rows.append(("Other pairs errors", per_method(
            lambda r, s: sum(e["errors"] for e in r.test["pair_errors"] if (e["true"], e["predicted"]) not in named_set),
            1)))
    else:
        k = len(seeds[0].cost_matrix.classes)
        for rank in range(min(TOP_PAIRS, k * (k - 1))):
            rows.append((f"Top {rank + 1} cost pair error (%)",
                         per_method(lambda r, s, i=rank: 100 * _top_pair_rate(r, s.cost_matrix, i), 2)))
    rows.append(("Errors", per_method(lambda r, s: r.test["errors"], 1)))
    rows.append(("Accuracy (%)", per_method(lambda r, s: 100 * r.test["accuracy"], 2)))
    return rows


def format_report(result: ExperimentResult) -> str:
    """The printed report: table, selection rule, chosen hyperparameters, baseline models, timing."""
    config, seeds = result.config, result.seeds
    methods = list(config.methods)
    rows = table_rows(result)
    label_width = max(len(label) for label, _ in rows) + 2
    widths = [max(len(m), *(len(cells[i]) for _, cells in rows)) + 2 for i, m in enumerate(methods)]
    n_test = seeds[0].runs[methods[0]].test["n"]
    lines = [f"rxverify experiment {config.dataset}: test split (n={n_test}), mean(std) over "
             f"{len(seeds)} seed(s) {[s.seed for s in seeds]}; costs: {seeds[0].cost_source}"
             + (" (one draw per seed)" if len({s.cost_matrix.fingerprint() for s in seeds}) > 1 else ""),
             "".ljust(label_width) + "".join(m.rjust(w) for m, w in zip(methods, widths, strict=True))]
    for label, cells in rows:
        lines.append(label.ljust(label_width) + "".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    lines += ["", f"Selection rule: {config.selection_rule()}.", "Chosen grid points (seed: point):"]
    for method in methods:
        chosen = "; ".join(f"{s.seed}: {s.runs[method].chosen.label()}" for s in seeds)
        size = len(seeds[0].runs[method].candidates)
        lines.append(f"  {method:9s} ({size} candidates) {chosen}")
    lines.append("Baseline models (before fine-tuning):")
    for s in seeds:
        info = s.baseline_model
        confused = ", ".join(f"{c['true']}->{c['predicted']} x{c['errors']}" for c in info["valid_most_confused"][:3])
        lines.append(f"  seed {s.seed}: train accuracy {100 * info['train_accuracy']:.2f}%, valid accuracy "
                     f"{100 * info['valid_accuracy']:.2f}%, valid cost {info['valid_total_cost']:.2f}; "
                     f"most confused on valid: {confused or 'none'}")
    timing = ", ".join(f"{m} {sum(s.runs[m].time_s for s in seeds):.0f}s" for m in methods)
    lines.append(f"Wall time {result.elapsed_s:.0f}s on {result.device} (per method, all seeds: {timing})")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _run_json(run: MethodRun) -> dict[str, Any]:
    test = run.test
    return {"seed": run.seed, "total_cost": test["total_cost"], "wer": test["wer"], "accuracy": test["accuracy"],
            "n_test": test["n"], "errors": test["errors"], "pair_errors": test["pair_errors"],
            "hyperparameters": run.chosen.to_dict(),
            "valid": {"total_cost": run.valid["total_cost"], "accuracy": run.valid["accuracy"], "n": run.valid["n"]},
            "candidates": run.candidates, "fit": run.fit, "time_s": run.time_s}


def to_json(result: ExperimentResult) -> dict[str, Any]:
    """Per method and seed: total_cost, wer, accuracy, n_test, pair_errors, chosen hyperparameters; plus config."""
    config, seeds = result.config, result.seeds
    results = {m: [_run_json(s.runs[m]) for s in seeds] for m in config.methods}
    summary: dict[str, Any] = {}
    for method, runs in results.items():
        summary[method] = {key: dict(zip(("mean", "std"), mean_std([r[key] for r in runs]), strict=True))
                           for key in ("total_cost", "wer", "accuracy")}
    if "baseline" in summary and summary["baseline"]["total_cost"]["mean"] > 0:
        for method in summary:
            summary[method]["cost_ratio_to_baseline"] = (summary[method]["total_cost"]["mean"]
                                                         / summary["baseline"]["total_cost"]["mean"])
    critical = _critical_set(result)
    if critical is not None:
        # Test errors summed over the named (costly) pairs, per run and as mean/std per method.
        for method, runs in results.items():
            for run, seed in zip(runs, seeds, strict=True):
                run["critical_errors"] = critical_errors(seed.runs[method], critical)
            summary[method]["critical_errors"] = dict(zip(
                ("mean", "std"), mean_std([r["critical_errors"] for r in runs]), strict=True))
        if "baseline" in summary and summary["baseline"]["critical_errors"]["mean"] > 0:
            for method in summary:
                summary[method]["critical_errors_ratio_to_baseline"] = (
                    summary[method]["critical_errors"]["mean"] / summary["baseline"]["critical_errors"]["mean"])
    payload = {
        "dataset": config.dataset,
        "config": dataclasses.asdict(config),
        "selection_rule": config.selection_rule(),
        "recipe": result.recipe.to_dict(),
        "device": result.device,
        "results": results,
        "summary": summary,
        "critical_pairs": sorted([t, p] for t, p in critical) if critical is not None else None,
        "seeds": [{"seed": s.seed, "cost_source": s.cost_source, "cost_matrix_sha256": s.cost_matrix.fingerprint(),
                   "classes": list(s.cost_matrix.classes), "cost_matrix": s.cost_matrix.matrix.tolist(),
                   "baseline_model": s.baseline_model, "time_s": s.time_s} for s in seeds],
        "timing": {"total_s": result.elapsed_s,
                   "per_method_s": {m: sum(s.runs[m].time_s for s in seeds) for m in config.methods}},
    }
    return _clean(payload)
