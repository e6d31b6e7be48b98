"""Model evaluation for the registry: cost reports with confusion matrices, and the paper's comparison tables.

Reports are computed from a confusion matrix, so one stored confusion can be re-scored under another
cost matrix (the promotion gate scores under the ACTIVE matrix, training under the job's). Tables follow
the paper: Table 5 (total cost, error rate of each expert-cost pair, overall accuracy) and Table 6
(errors per expert-cost pair with its cost, plus all other pairs together), parent beside candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.costs import DEFAULT_OFF_DIAGONAL_COST, CostMatrix
from models.evaluate import cost_report

if TYPE_CHECKING:
    from models.ood import Familiarity

SPLITS = ("valid", "test")


@dataclass(frozen=True)
class SplitEvaluation:
    """One model on one split: the cost report (with confusion), plus probabilities and labels for fitting."""

    report: dict[str, Any]
    probs: Any
    labels: Any


def _split_loaders(checkpoint_dir: str | Path, *, data_root: str | Path, device: str, splits: Sequence[str],
                   batch_size: int) -> tuple[Any, Any, dict[str, Any]]:
    """The checkpoint loaded on `device`, its torch device, and a loader per split preprocessed with the
    checkpoint's own EvalPreset."""
    from torch.utils.data import DataLoader

    from models.checkpoint import load_checkpoint
    from models.data import ImageFileDataset, load_image_folder
    from models.runtime import select_device
    from models.transforms import EvalPreset

    torch_device = select_device(device)
    loaded = load_checkpoint(checkpoint_dir, device=torch_device)
    metadata = loaded.metadata
    data = load_image_folder(data_root, image_size=metadata.image_size, augment=False, classes=metadata.classes)
    preset = EvalPreset.from_metadata(metadata)
    loaders = {}
    for split in splits:
        dataset = getattr(data, split)
        assert isinstance(dataset, ImageFileDataset)  # load_image_folder's contract
        loaders[split] = DataLoader(dataset.with_transform(preset), batch_size=batch_size, shuffle=False)
    return loaded, torch_device, loaders


def evaluate_checkpoint(checkpoint_dir: str | Path, *, data_root: str | Path, cost_matrix: CostMatrix,
                        device: str = "cpu", splits: Sequence[str] = SPLITS,
                        batch_size: int = 64) -> dict[str, SplitEvaluation]:
    """Score a checkpoint on splits of a PMI-layout folder, preprocessed with the checkpoint's own EvalPreset."""
    from models.evaluate import evaluate

    loaded, torch_device, loaders = _split_loaders(checkpoint_dir, data_root=data_root, device=device,
                                                   splits=splits, batch_size=batch_size)
    metadata = loaded.metadata
    matrix = cost_matrix.reindexed(metadata.classes)
    results: dict[str, SplitEvaluation] = {}
    for split, loader in loaders.items():
        result = evaluate(loaded.model, loader, cost_matrix=matrix, device=torch_device,
                          temperature=metadata.temperature, output_kind=metadata.output_kind)
        report = {**result.summary(), "classes": list(metadata.classes),
                  "confusion": result.confusion.astype(int).tolist()}
        results[split] = SplitEvaluation(report=_plain(report), probs=result.probs, labels=result.labels)
    return results


def fit_checkpoint_familiarity(checkpoint_dir: str | Path, *, data_root: str | Path, device: str = "cpu",
                               batch_size: int = 64) -> Familiarity:
    """`models.ood`'s familiarity model of a checkpoint: its feature stages on the train split, thresholds'
    scores on the valid split (ValueError when it cannot be fitted: too few photos, no feature stages)."""
    from models.ood import collect_features, fit_familiarity

    loaded, torch_device, loaders = _split_loaders(checkpoint_dir, data_root=data_root, device=device,
                                                   splits=("train", "valid"), batch_size=batch_size)
    train = collect_features(loaded.model, loaders["train"], device=torch_device)
    valid, _labels = collect_features(loaded.model, loaders["valid"], device=torch_device)
    return fit_familiarity(train, valid, num_classes=loaded.metadata.num_classes,
                           weights_sha256=loaded.weights_sha256)


def rescore(report: dict[str, Any], cost_matrix: CostMatrix) -> dict[str, Any]:
    """The same confusion matrix scored under another cost matrix (its classes reindexed to the report's)."""
    classes = tuple(report["classes"])
    confusion = np.asarray(report["confusion"], dtype=np.int64)
    rescored = cost_report(confusion, cost_matrix.reindexed(classes))
    return _plain({**rescored, "classes": list(classes), "confusion": confusion.tolist()})


def pair_errors(report: dict[str, Any], true: str, predicted: str) -> int:
    """Errors of one (true, predicted) pair, read from the confusion matrix."""
    classes = list(report["classes"])
    if true not in classes or predicted not in classes:
        return 0
    return int(report["confusion"][classes.index(true)][classes.index(predicted)])


def expert_pairs(cost_matrix: CostMatrix, classes: Sequence[str]) -> list[tuple[str, str, float]]:
    """Pairs among `classes` whose cost exceeds the default of 1, costliest first (the paper's table rows)."""
    known = set(classes)
    pairs = [(t, p, c) for t, p, c in cost_matrix.entries()
             if t in known and p in known and t != p and c > DEFAULT_OFF_DIAGONAL_COST]
    return sorted(pairs, key=lambda item: (-item[2], item[0], item[1]))


def comparison(*, candidate: dict[str, dict[str, Any]], parent: dict[str, dict[str, Any]] | None,
               cost_matrix: CostMatrix) -> dict[str, Any]:
    """Side-by-side tables per split in the form of the paper's Tables 5 and 6 (parent None: candidate only)."""
    tables: dict[str, Any] = {}
    for split, report in candidate.items():
        other = (parent or {}).get(split)
        columns = {"parent": rescore(other, cost_matrix)} if other is not None else {}
        columns["candidate"] = rescore(report, cost_matrix)  # the paper's order: baseline, then the new method
        tables[split] = _tables(columns, cost_matrix)
    return tables


def _tables(columns: dict[str, dict[str, Any]], cost_matrix: CostMatrix) -> dict[str, Any]:
    classes = columns["candidate"]["classes"]
    pairs = expert_pairs(cost_matrix, classes)

    def rate(report: dict[str, Any], true: str, predicted: str) -> float:
        confusion = report["confusion"]
        support = sum(confusion[classes.index(true)])
        return 100.0 * pair_errors(report, true, predicted) / support if support else 0.0

    def row(metric: str, value: Any) -> dict[str, Any]:
        return {"metric": metric, **{name: value(report) for name, report in columns.items()}}

    table5 = [row("Total cost", lambda r: r["total_cost"]), row("WER (mean cost per image)", lambda r: r["wer"])]
    table5 += [row(f"{t} to {p} error rate (%)", lambda r, t=t, p=p: rate(r, t, p)) for t, p, _ in pairs]
    table5.append(row("Overall accuracy (%)", lambda r: 100.0 * r["accuracy"]))
    table6 = [{"error_type": f"{t} to {p}", "expert_cost": c,
               **{name: pair_errors(report, t, p) for name, report in columns.items()}} for t, p, c in pairs]
    listed = {(t, p) for t, p, _ in pairs}
    table6.append({"error_type": "Other pairs", "expert_cost": None,
                   **{name: int(report["errors"]) - sum(pair_errors(report, t, p) for t, p in listed)
                      for name, report in columns.items()}})
    return {"n": columns["candidate"]["n"], "table5": table5, "table6": table6}


def summary(report: dict[str, Any], *, top: int = 5) -> dict[str, Any]:
    """The headline numbers of a report (for lists)."""
    return {"n": report.get("n"), "total_cost": report.get("total_cost"), "wer": report.get("wer"),
            "accuracy": report.get("accuracy"), "top_pairs": list(report.get("pair_errors", []))[:top]}


def _plain(value: Any) -> Any:
    """Plain JSON values (numpy scalars and tuples converted, non-finite floats to None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
