"""Temperature scaling recovers a known temperature and stays bounded on separable data."""

from __future__ import annotations

import pytest
import torch

from models.calibrate import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    apply_temperature,
    calibrated_probabilities,
    fit_temperature,
)


def _synthetic(temperature: float, *, n: int = 3000, k: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true T is known."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_recovers_known_temperature(true_temperature: float) -> None:
    logits, labels = _synthetic(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.1)


def test_perfectly_separated_is_clamped() -> None:
    logits = torch.eye(4).repeat(10, 1) * 2  # right everywhere: NLL keeps falling as T -> 0
    labels = torch.arange(4).repeat(10)
    assert fit_temperature(logits, labels) == MIN_TEMPERATURE
    assert fit_temperature(logits, (labels + 1) % 4) == MAX_TEMPERATURE


def test_fitted_temperature_lowers_nll() -> None:
    logits, labels = _synthetic(2.0, seed=1)
    t = fit_temperature(logits, labels)
    before = torch.nn.functional.cross_entropy(logits, labels)
    after = torch.nn.functional.cross_entropy(apply_temperature(logits, t), labels)
    assert after < before


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="N x K"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="lie in"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(torch.zeros(1, 2), 0.0)


def test_calibrated_probabilities() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(calibrated_probabilities(logits, 2.0), torch.softmax(logits / 2, dim=1))
