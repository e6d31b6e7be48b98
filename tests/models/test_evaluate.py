"""Evaluation metrics on hand-made confusion matrices, the Bayes rule, ECE and the loader helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.costs import CostMatrix
from models.evaluate import (
    bayes_decision,
    collect_outputs,
    confusion_matrix,
    cost_report,
    evaluate,
    expected_calibration_error,
    expected_costs,
    predictions_from_outputs,
)

CLASSES = ("a", "b", "c")
# c(a->b) = 10, c(b->a) = 1, c(c->a) = 0.5, the rest 1.
COSTS = CostMatrix.from_pairs(CLASSES, {("a", "b"): 10, ("c", "a"): 0.5})


def test_confusion_matrix_rows_are_truth() -> None:
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0, 2]
    expected = np.array([[1, 2, 0], [1, 1, 0], [0, 0, 1]])
    assert np.array_equal(confusion_matrix(labels, predictions, 3), expected)
    assert np.array_equal(confusion_matrix(torch.tensor(labels), torch.tensor(predictions), 3), expected)
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix([0, 3], [0, 0], 3)
    with pytest.raises(ValueError, match="labels but"):
        confusion_matrix([0, 1], [0], 3)


def test_cost_report_hand_computed() -> None:
    confusion = np.array([
        [8, 2, 0],   # a: 10 samples, 2 predicted as b (cost 10 each)
        [1, 4, 0],   # b: 5 samples, 1 predicted as a (cost 1)
        [3, 0, 7],   # c: 10 samples, 3 predicted as a (cost 0.5 each)
    ])
    report = cost_report(confusion, COSTS, top=2)
    assert report["n"] == 25
    assert report["total_cost"] == pytest.approx(2 * 10 + 1 * 1 + 3 * 0.5)
    assert report["wer"] == pytest.approx(22.5 / 25)
    assert report["accuracy"] == pytest.approx(19 / 25)
    assert report["errors"] == 6
    pairs = [(p["true"], p["predicted"], p["cost"], p["errors"], p["rate"]) for p in report["pair_errors"]]
    assert pairs == [
        ("a", "b", 10.0, 2, pytest.approx(0.2)),  # the expensive pair first
        ("b", "a", 1.0, 1, pytest.approx(0.2)),
        ("c", "a", 0.5, 3, pytest.approx(0.3)),
    ]
    assert report["top_pairs"] == report["pair_errors"][:2]
    assert set(report["pair_errors"][0]) == {"true", "predicted", "cost", "errors", "rate"}


def test_cost_report_lists_expensive_pairs_without_errors() -> None:
    report = cost_report(np.diag([5, 5, 5]), COSTS)
    assert report["total_cost"] == 0 and report["wer"] == 0 and report["accuracy"] == 1
    assert [(p["true"], p["predicted"], p["errors"], p["rate"]) for p in report["pair_errors"]] == [("a", "b", 0, 0)]


def test_cost_report_uniform_costs_wer_is_error_rate() -> None:
    confusion = np.array([[3, 1], [2, 4]])
    report = cost_report(confusion, CostMatrix.uniform(("x", "y")))
    assert report["wer"] == pytest.approx(1 - report["accuracy"]) == pytest.approx(0.3)


def test_cost_report_plain_array_and_empty() -> None:
    report = cost_report(np.zeros((2, 2), dtype=int), np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert report["n"] == 0 and report["wer"] == 0.0 and report["accuracy"] == 0.0
    assert report["pair_errors"] == [{"true": 0, "predicted": 1, "cost": 3.0, "errors": 0, "rate": 0.0}]
    with pytest.raises(ValueError, match="same K x K"):
        cost_report(np.zeros((2, 2)), COSTS)


def test_bayes_decision_with_asymmetric_costs() -> None:
    probs = np.array([
        [0.6, 0.4, 0.0],    # argmax a; E[cost] of a = 0.4*1 = 0.4, of b = 0.6*10 = 6 -> a
        [0.45, 0.55, 0.0],  # argmax b, but predicting b risks 0.45*10 = 4.5 vs a: 0.55 -> a
        [0.05, 0.9, 0.05],  # b: 0.05*10 + 0.05*1 = 0.55; a: 0.9 + 0.025 = 0.925; c: 0.95 -> b
    ])
    assert bayes_decision(probs, COSTS).tolist() == [0, 0, 1]
    assert np.allclose(expected_costs(probs, COSTS)[1], [0.55, 4.5, 1.0])
    decided = bayes_decision(torch.tensor(probs), COSTS)
    assert isinstance(decided, torch.Tensor) and decided.tolist() == [0, 0, 1]
    uniform = CostMatrix.uniform(CLASSES)
    assert bayes_decision(probs, uniform).tolist() == probs.argmax(axis=1).tolist()


def test_predictions_from_outputs() -> None:
    outputs = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    assert predictions_from_outputs(outputs, "logits").tolist() == [1, 0]
    assert predictions_from_outputs(outputs, "costs").tolist() == [0, 1]
    with pytest.raises(ValueError, match="output_kind"):
        predictions_from_outputs(outputs, "probs")


def test_ece_known_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)
    # Confidence 0.8 everywhere, 3 of 4 right: |0.75 - 0.8| = 0.05.
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.05)
    # Two bins: confidence 0.9 (both right: 0.1 gap) and 0.6 (both wrong: 0.6 gap), half each.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])
    assert expected_calibration_error(probs, np.array([0, 1, 0, 1]), bins=10) == pytest.approx(0.35)
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0)) == 0.0


class _Fixed(nn.Module):
    """Returns the first K input features as logits; has BN so eval/train mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if not self.training else self.bn(x)


def _loader() -> DataLoader:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [4.0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2, 2])
    return DataLoader(TensorDataset(logits, labels), batch_size=2)


def test_collect_outputs_eval_mode_no_grad_and_restores_mode() -> None:
    model = _Fixed().train()
    outputs, labels = collect_outputs(model, _loader(), device="cpu")
    assert model.training
    assert outputs.dtype == torch.float32 and not outputs.requires_grad
    assert outputs.shape == (5, 3) and labels.tolist() == [0, 1, 0, 2, 2]
    assert torch.equal(outputs[2], torch.tensor([4.0, 5.0, 0]))


def test_evaluate_end_to_end() -> None:
    result = evaluate(_Fixed(), _loader(), cost_matrix=COSTS, device="cpu")
    # Sample 2 (true a) is predicted b (cost 10); sample 4 (true c) is predicted a (cost 0.5).
    assert result.report["total_cost"] == pytest.approx(10.5)
    assert result.report["accuracy"] == pytest.approx(0.6)
    assert result.confusion[0, 1] == 1 and result.confusion[2, 0] == 1
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(5))
    assert result.summary()["ece"] == result.ece
    bayes = evaluate(_Fixed(), _loader(), cost_matrix=COSTS, device="cpu", bayes=True)
    # The Bayes rule moves sample 2 from b (risk 10 * p(a)) to a.
    assert bayes.report["total_cost"] == pytest.approx(0.5)
    hot = evaluate(_Fixed(), _loader(), cost_matrix=COSTS, device="cpu", temperature=100.0)
    assert hot.probs.max() < 0.35
    with pytest.raises(ValueError, match="cost matrix has 2 classes"):
        evaluate(_Fixed(), _loader(), cost_matrix=CostMatrix.uniform(("a", "b")), device="cpu")
