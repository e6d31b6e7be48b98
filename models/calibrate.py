"""Temperature scaling (Guo et al. 2017): one scalar T fitted by NLL on validation logits."""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

# A perfectly separated validation set drives the NLL-optimal T towards 0 (or infinity for a model
# that is confidently wrong); the bounds keep the fitted T finite and the probabilities usable.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits / temperature, labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100,
                    min_temperature: float = MIN_TEMPERATURE, max_temperature: float = MAX_TEMPERATURE) -> float:
    """Fit T minimising the NLL of softmax(logits / T) with LBFGS over a bounded log T."""
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).ravel()
    if logits.ndim != 2 or logits.shape[0] != labels.numel():
        raise ValueError(f"logits {tuple(logits.shape)} must be N x K with N = {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("cannot fit a temperature on an empty validation set")
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    if not 0 < min_temperature <= 1 <= max_temperature:
        raise ValueError("the temperature bounds must satisfy 0 < min <= 1 <= max")
    low, high = math.log(min_temperature), math.log(max_temperature)

    # log T = low + (high - low) * sigmoid(u): LBFGS runs unconstrained in u and T never leaves the
    # bounds, so the line search can never produce an overflowing 1/T.
    def temperature_of(u: torch.Tensor) -> torch.Tensor:
        return torch.exp(low + (high - low) * torch.sigmoid(u))

    at_one = -low / (high - low)  # the sigmoid value that puts T at 1
    start = math.log(at_one / (1 - at_one))
    u = torch.tensor([start], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll(logits, labels, temperature_of(u))
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        fitted = float(temperature_of(u))
        # LBFGS on a flat tail can stop early; never return a T worse than the bounds or T = 1.
        candidates = [fitted, 1.0, min_temperature, max_temperature]
        losses = [float(_nll(logits, labels, torch.tensor(t, dtype=torch.float64))) for t in candidates]
    best = candidates[min(range(len(candidates)), key=losses.__getitem__)]
    best = min(max(best, min_temperature), max_temperature)
    logger.info("fitted temperature %.4f (NLL %.4f at T=1, %.4f fitted)", best, losses[1], min(losses))
    return best


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by T (softmax of the result gives calibrated probabilities)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and positive (got {temperature})")
    return logits / temperature


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T)."""
    return torch.softmax(apply_temperature(logits.float(), temperature), dim=1)
