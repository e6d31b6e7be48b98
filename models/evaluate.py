"""Evaluation: outputs, confusion, the paper's cost metrics (total cost, WER, pair errors), ECE, Bayes rule."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.costs import CostMatrix
from models.runtime import autocast_context

OUTPUT_KINDS = ("logits", "costs")

ArrayLike = np.ndarray | torch.Tensor | Sequence[int] | Sequence[float]


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _cost_array(cost_matrix: CostMatrix | np.ndarray) -> np.ndarray:
    return np.asarray(cost_matrix.matrix if isinstance(cost_matrix, CostMatrix) else cost_matrix, dtype=np.float64)


def collect_outputs(model: nn.Module, loader: Iterable[Any], *, device: torch.device | str,
                    amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model over a loader in eval mode without gradients; return CPU float outputs and labels."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, targets = batch[0], batch[1]
                with autocast_context(device, enabled=amp):
                    result = model(inputs.to(device, non_blocking=True))
                outputs.append(result.float().cpu())
                labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def predictions_from_outputs(outputs: torch.Tensor, output_kind: str) -> torch.Tensor:
    """Class indices: argmax of logits, or argmin of regressed costs (CNN_SOSR)."""
    if output_kind == "logits":
        return outputs.argmax(dim=1)
    if output_kind == "costs":
        return outputs.argmin(dim=1)
    raise ValueError(f"output_kind must be one of {OUTPUT_KINDS} (got {output_kind!r})")


def probabilities_from_outputs(outputs: torch.Tensor, output_kind: str, *, temperature: float = 1.0) -> torch.Tensor:
    """Softmax of logits / T; for regressed costs, softmax of -costs / T (a score, not a calibrated probability)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (got {temperature})")
    if output_kind == "logits":
        return torch.softmax(outputs.float() / temperature, dim=1)
    if output_kind == "costs":
        return torch.softmax(-outputs.float() / temperature, dim=1)
    raise ValueError(f"output_kind must be one of {OUTPUT_KINDS} (got {output_kind!r})")


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> np.ndarray:
    """K x K int64 counts, rows the true class and columns the predicted one."""
    true = _numpy(labels).astype(np.int64).ravel()
    predicted = _numpy(predictions).astype(np.int64).ravel()
    if true.shape != predicted.shape:
        raise ValueError(f"{true.size} labels but {predicted.size} predictions")
    for name, values in (("labels", true), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    counts = np.bincount(true * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def cost_report(confusion: np.ndarray, cost_matrix: CostMatrix | np.ndarray, *, top: int = 10) -> dict[str, Any]:
    """Total cost, WER (mean cost per prediction), accuracy, n, and per-pair errors (top-cost pairs first)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    costs = _cost_array(cost_matrix)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape != costs.shape:
        raise ValueError(f"confusion {confusion.shape} and cost matrix {costs.shape} must be the same K x K")
    k = confusion.shape[0]
    names: Sequence[Any] = cost_matrix.classes if isinstance(cost_matrix, CostMatrix) else list(range(k))
    n = int(confusion.sum())
    support = confusion.sum(axis=1)
    total_cost = float((confusion * costs).sum())
    correct = int(np.trace(confusion))
    cells = [(i, j) for i in range(k) for j in range(k)
             if i != j and (confusion[i, j] > 0 or costs[i, j] > 1)]
    # Top-cost pairs first; among equal costs, the pairs with more errors, then class order.
    cells.sort(key=lambda c: (-costs[c], -confusion[c], c))
    pairs = [{"true": names[i], "predicted": names[j], "cost": float(costs[i, j]),
              "errors": int(confusion[i, j]), "rate": int(confusion[i, j]) / int(support[i]) if support[i] else 0.0}
             for i, j in cells]
    return {
        "n": n,
        "total_cost": total_cost,
        "wer": total_cost / n if n else 0.0,
        "accuracy": correct / n if n else 0.0,
        "errors": n - correct,
        "pair_errors": pairs,
        "top_pairs": pairs[:top],
    }


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, *, bins: int = 15) -> float:
    """Top-label ECE over equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / n."""
    p = _numpy(probs).astype(np.float64)
    y = _numpy(labels).astype(np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probs {p.shape} must be N x K with N = {y.size} labels")
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if y.size == 0:
        return 0.0
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bins are (lo, hi]; a confidence of exactly 0 (impossible for a distribution) lands in the first.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += abs(correct[members].mean() - confidence[members].mean()) * members.sum()
    return float(total / y.size)


def expected_costs(probs: ArrayLike, cost_matrix: CostMatrix | np.ndarray) -> np.ndarray:
    """N x K expected cost of each decision z: sum_y p(y) c(y, z)."""
    p = _numpy(probs).astype(np.float64)
    return p @ _cost_array(cost_matrix)


def bayes_decision(probs: ArrayLike, cost_matrix: CostMatrix | np.ndarray) -> np.ndarray | torch.Tensor:
    """The post-hoc Bayes rule argmin_z sum_y p(y) c(y, z); a tensor in gives a tensor out."""
    decision = expected_costs(probs, cost_matrix).argmin(axis=1)
    if isinstance(probs, torch.Tensor):
        return torch.from_numpy(decision).to(probs.device)
    return decision


@dataclass(frozen=True)
class EvaluationResult:
    """A cost report with the confusion matrix, probabilities, labels and ECE behind it."""

    report: dict[str, Any]
    confusion: np.ndarray
    probs: torch.Tensor
    labels: torch.Tensor
    ece: float

    def summary(self) -> dict[str, Any]:
        """The report plus ECE, for JSON or checkpoint metrics."""
        return {**self.report, "ece": self.ece}


def evaluate(model: nn.Module, loader: Iterable[Any], *, cost_matrix: CostMatrix | np.ndarray,
             device: torch.device | str, temperature: float = 1.0, output_kind: str = "logits",
             bayes: bool = False, amp: bool = False, top: int = 10) -> EvaluationResult:
    """Run a model over a loader and score it against a cost matrix (argmax/argmin, or the Bayes rule)."""
    outputs, labels = collect_outputs(model, loader, device=device, amp=amp)
    k = _cost_array(cost_matrix).shape[0]
    if outputs.numel() == 0:
        outputs = torch.empty(0, k)
    elif outputs.shape[1] != k:
        raise ValueError(f"the model gives {outputs.shape[1]} outputs but the cost matrix has {k} classes")
    probs = probabilities_from_outputs(outputs, output_kind, temperature=temperature)
    predictions = bayes_decision(probs, cost_matrix) if bayes else predictions_from_outputs(outputs, output_kind)
    confusion = confusion_matrix(labels, predictions, k)
    return EvaluationResult(report=cost_report(confusion, cost_matrix, top=top), confusion=confusion,
                            probs=probs, labels=labels, ece=expected_calibration_error(probs, labels))
