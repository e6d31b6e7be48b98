"""Comparison methods: each trains one epoch on the tiny CNN, and each loss matches its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from models.costs import CostMatrix
from models.engine import ProgressEvent, TrainConfig, create_train_loader, fit
from models.methods import METHOD_NAMES, create_method, find_head, log_one_minus_softmax
from models.networks import create_model

CLASSES = ("00378-0208", "00591-0461", "50111-0434")


def image_data(seed: int = 0, n: int = 24) -> TensorDataset:
    """Class-dependent brightness patterns on 8x8 RGB images: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.randn(n, 3, 8, 8, generator=generator)
    x[:, 0] += (y == 0).float()[:, None, None]
    x[:, 1] += (y == 1).float()[:, None, None]
    x[:, 2] += (y == 2).float()[:, None, None]
    return TensorDataset(x, y)


def costs() -> CostMatrix:
    return CostMatrix.from_pairs(CLASSES, {("50111-0434", "00591-0461"): 10.0, ("00378-0208", "50111-0434"): 4.0})


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_runs_one_epoch_on_the_tiny_cnn(name: str) -> None:
    data = image_data()
    model = create_model("tiny_cnn", 3)
    hyper = {"eps": 0.5, "steps": 3, "step_size": 0.2} if name == "csada" else {}
    method = create_method(name, cost_matrix=costs(), **hyper)
    events: list[ProgressEvent] = []
    result = fit(model, train_loader=create_train_loader(data, batch_size=8, seed=0), method=method,
                 config=TrainConfig(epochs=1, batch_size=8, lr=1e-3), device="cpu", progress=events.append,
                 valid_loader=create_train_loader(data, batch_size=12, seed=1))
    assert result.epochs_run == 1 and not result.stopped
    assert len(events) == 3 and all(torch.isfinite(torch.tensor(e.loss)) for e in events)
    assert 0.0 <= result.history[0]["valid_accuracy"] <= 1.0
    if name == "csada":
        assert all(e.attack_success_rate is not None for e in events)
        assert result.mean_attack_active_steps is not None
    else:
        assert all(e.attack_success_rate is None for e in events)


def test_log_one_minus_softmax_is_exact_and_stable() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0], [100.0, 0.0, 0.0]])
    values = log_one_minus_softmax(logits)
    expected = torch.log1p(-torch.softmax(logits[:1].double(), dim=1)).float()
    assert torch.allclose(values[:1], expected, atol=1e-6)
    assert torch.isfinite(values).all()
    assert values[1, 0] == pytest.approx(-100.0 + torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_penalty_with_a_single_pair_is_equation_3() -> None:
    matrix = CostMatrix.single_pair(CLASSES, "50111-0434", "00591-0461")
    method = create_method("penalty", cost_matrix=matrix)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    p = torch.softmax(model(x), dim=1)
    expected = (-(y == 2).float() * torch.log(1 - p[:, 1])).mean()
    assert method.compute_loss(model, x, y).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ap_is_ce_plus_alpha_penalty() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    penalty = create_method("penalty", cost_matrix=costs()).compute_loss(model, x, y).loss
    ap = create_method("ap", cost_matrix=costs(), alpha=2.5).compute_loss(model, x, y).loss
    assert ap.item() == pytest.approx((F.cross_entropy(model(x), y) + 2.5 * penalty).item(), rel=1e-5)


def test_reweight_with_uniform_costs_is_cross_entropy() -> None:
    torch.manual_seed(2)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    loss = create_method("reweight", cost_matrix=CostMatrix.uniform(CLASSES)).compute_loss(model, x, y).loss
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_sosr_regresses_costs_and_keeps_predictions_when_converting_a_classifier() -> None:
    method = create_method("sosr", cost_matrix=costs())
    assert method.output_kind == "costs"
    torch.manual_seed(3)
    model = create_model("tiny_cnn", 3).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        before = model(x).argmax(dim=1)
        method.prepare_model(model)
        assert torch.equal(method.predict(model(x)), before)
    # The loss is the smooth one-sided regression: softplus(z * (r - c)), z = +1 on zero-cost classes.
    fixed = nn.Identity()
    r = torch.tensor([[0.0, 1.0, 12.0]])
    c = torch.tensor([[0.0, 1.0, 4.0]])  # costs of row "00378-0208"
    expected = F.softplus(r[0, 0] - c[0, 0]) + F.softplus(-(r[0, 1] - c[0, 1])) + F.softplus(-(r[0, 2] - c[0, 2]))
    assert method.compute_loss(fixed, r, torch.tensor([0])).loss.item() == pytest.approx(expected.item())


def test_create_method_rejects_unknown_names_and_hyperparameters() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        create_method("nope", cost_matrix=costs())
    with pytest.raises(ValueError, match="hyperparameters"):
        create_method("ap", cost_matrix=costs(), beta=1.0)
    with pytest.raises(ValueError, match="unknown CSADA"):
        create_method("csada", cost_matrix=costs(), alpha=1.0)


def test_find_head_prefers_fc_then_last_linear() -> None:
    model = create_model("tiny_cnn", 3)
    assert find_head(model) is model.fc
    sequential = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    assert find_head(sequential) is sequential[2]
