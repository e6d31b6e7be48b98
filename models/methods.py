"""Training methods behind one interface: the CE baseline, the comparison methods, and CSADA.

A method turns a batch into a loss. The engine (`models.engine.fit`) owns the loop, the optimizer,
AMP, callbacks and checkpoints, so every method trains under exactly the same conditions. CSADA lives
in `models.csada` and is created through `create_method` like the others.

Cost-matrix conventions follow `models.costs`: c[y, z] is the cost of predicting z for truth y.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from models.costs import CostMatrix

METHOD_NAMES = ("baseline", "csada", "penalty", "ap", "sosr", "reweight")


@dataclass(frozen=True)
class AttackStats:
    """What the adversarial part of one training step did (CSADA only)."""

    attacked: int  # samples attacked (not skipped)
    successes: int  # attacked samples that reached the target
    active_steps: int  # sum over attacked samples of their active ascent steps
    steps_run: int  # batched ascent iterations (the per-step cost driver)

    @property
    def success_rate(self) -> float:
        """Successes over attacked samples (0.0 when none was attacked)."""
        return self.successes / self.attacked if self.attacked else 0.0


@dataclass
class LossOutput:
    """A method's loss for one batch (a scalar tensor to backpropagate) plus optional attack stats."""

    loss: Tensor
    attack: AttackStats | None = None


class Method:
    """Base class: cross-entropy on logits; subclasses override `compute_loss` and the hooks."""

    name: ClassVar[str] = "baseline"
    output_kind: ClassVar[str] = "logits"

    def __init__(self, *, cost_matrix: CostMatrix) -> None:
        self.cost_matrix = cost_matrix
        self._costs: dict[torch.device, Tensor] = {}

    @property
    def num_classes(self) -> int:
        """K, the number of classes of the cost matrix (and of the model's outputs)."""
        return len(self.cost_matrix.classes)

    def hyperparameters(self) -> dict[str, Any]:
        """The method's hyperparameters as plain JSON values (for checkpoint metadata)."""
        return {}

    def costs(self, device: torch.device) -> Tensor:
        """The K x K cost matrix as a float32 tensor on `device` (cached)."""
        if device not in self._costs:
            self._costs[device] = torch.tensor(self.cost_matrix.matrix, dtype=torch.float32, device=device)
        return self._costs[device]

    def prepare_model(self, model: nn.Module) -> None:
        """Adapt a freshly given model before training starts (not on resume); default: nothing."""

    def setup(self, *, train_dataset: Dataset[Any]) -> None:
        """Look at the training set once before the first epoch; default: nothing."""

    def epoch_stream(self, *, epoch: int, seed: int, steps: int, batch_size: int,
                     loader: Any) -> Iterable[Any] | None:
        """Extra per-step inputs for one epoch (CSADA's class-a draws), zipped with the batches."""
        return None

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """The training loss on one batch."""
        return LossOutput(F.cross_entropy(model(x).float(), y))

    def predict(self, outputs: Tensor) -> Tensor:
        """Class predictions from the model's outputs (argmax of logits; argmin of costs)."""
        return outputs.argmin(dim=1) if self.output_kind == "costs" else outputs.argmax(dim=1)


class BaselineMethod(Method):
    """Plain cross-entropy (the paper's Baseline)."""

    name = "baseline"


class ReweightMethod(Method):
    """Cost-weighted cross-entropy: sample i weighs its class's total misclassification cost.

    w_y = sum_z c(y, z), divided by its mean over the classes so that a uniform matrix gives plain CE.
    The loss is the mean over the batch of w_{y_i} * CE_i. A class whose row is all zero gets weight 0.
    """

    name = "reweight"

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """Cost-weighted CE on one batch."""
        row = self.costs(x.device).sum(dim=1)
        weights = row / row.mean().clamp_min(1e-12)
        per_sample = F.cross_entropy(model(x).float(), y, reduction="none")
        return LossOutput((weights[y] * per_sample).mean())


class PenaltyMethod(Method):
    """Eq. (3) of the paper generalised to a full cost matrix.

    Eq. (3) penalises only the critical pair (y', z'): -1[y_i = y'] log(1 - p_z'(x_i)). With a full
    matrix each pair contributes in proportion to its cost: loss_i = -sum_z c(y_i, z) log(1 - p_z(x_i)).
    A single-pair matrix (cost 1 on (y', z'), 0 elsewhere) gives eq. (3) exactly. No CE term.
    """

    name = "penalty"

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """The cost-weighted penalty on one batch."""
        logits = model(x).float()
        penalty = -(self.costs(x.device)[y] * log_one_minus_softmax(logits)).sum(dim=1)
        return LossOutput(penalty.mean())


class AdjustedPenaltyMethod(Method):
    """AP (section 5.2): CE plus alpha times the cost-weighted penalty.

    loss_i = -log p_{y_i}(x_i) - alpha * sum_z c(y_i, z) log(1 - p_z(x_i)); the paper uses alpha = 5.
    """

    name = "ap"

    def __init__(self, *, cost_matrix: CostMatrix, alpha: float = 5.0) -> None:
        super().__init__(cost_matrix=cost_matrix)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (got {alpha})")
        self.alpha = float(alpha)

    def hyperparameters(self) -> dict[str, Any]:
        """{"alpha": alpha}."""
        return {"alpha": self.alpha}

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """CE plus the weighted penalty on one batch."""
        logits = model(x).float()
        penalty = -(self.costs(x.device)[y] * log_one_minus_softmax(logits)).sum(dim=1)
        return LossOutput(F.cross_entropy(logits, y) + self.alpha * penalty.mean())


class SosrMethod(Method):
    """CNN_SOSR (Chung et al., 2016): regress the cost vector with the smooth one-sided loss.

    The model's K outputs r_k(x) estimate the costs c(y, k); prediction is argmin_k r_k(x). With
    z_k = +1 when c(y, k) equals the true class's cost c(y, y) = 0 (the true class and any zero-cost
    class) and -1 otherwise, loss_i = sum_k softplus(z_k * (r_k(x_i) - c(y_i, k))): a one-sided push
    of the "free" classes' costs below their target and of the costly ones above theirs.

    `init_from_logits` (default True): when training starts from a cross-entropy model, negate its
    final linear layer so the regression head starts at r = -logits (argmin r = argmax logits, the
    same predictions). Set it False when the model already outputs costs (fine-tuning an SOSR model).
    """

    name = "sosr"
    output_kind = "costs"

    def __init__(self, *, cost_matrix: CostMatrix, init_from_logits: bool = True) -> None:
        super().__init__(cost_matrix=cost_matrix)
        self.init_from_logits = bool(init_from_logits)

    def hyperparameters(self) -> dict[str, Any]:
        """{"init_from_logits": ...}."""
        return {"init_from_logits": self.init_from_logits}

    def prepare_model(self, model: nn.Module) -> None:
        """Turn a logits head into a cost-regression head predicting the same classes."""
        if not self.init_from_logits:
            return
        head = find_head(model)
        with torch.no_grad():
            head.weight.neg_()
            if head.bias is not None:
                head.bias.neg_()

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """The smooth one-sided regression loss on one batch."""
        predicted_costs = model(x).float()
        target_costs = self.costs(x.device)[y]
        sign = torch.where(target_costs == target_costs.gather(1, y[:, None]), 1.0, -1.0)
        return LossOutput(F.softplus(sign * (predicted_costs - target_costs)).sum(dim=1).mean())


def log_one_minus_softmax(logits: Tensor) -> Tensor:
    """log(1 - softmax(logits)) per class, computed stably as log sum_{k != z} p_k (B x K)."""
    k = logits.shape[1]
    expanded = logits.unsqueeze(1).expand(-1, k, -1)
    others = expanded.masked_fill(torch.eye(k, dtype=torch.bool, device=logits.device), -math.inf)
    return torch.logsumexp(others, dim=2) - torch.logsumexp(logits, dim=1, keepdim=True)


def find_head(model: nn.Module) -> nn.Linear:
    """The model's final linear layer: `fc`, `head` or `classifier` if linear, else the last nn.Linear."""
    for attribute in ("fc", "head", "classifier"):
        candidate = getattr(model, attribute, None)
        if isinstance(candidate, nn.Linear):
            return candidate
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to use as its head")
    return linears[-1]


_SIMPLE_METHODS: dict[str, type[Method]] = {
    "baseline": BaselineMethod,
    "reweight": ReweightMethod,
    "penalty": PenaltyMethod,
    "ap": AdjustedPenaltyMethod,
    "sosr": SosrMethod,
}


def create_method(name: str, *, cost_matrix: CostMatrix, **hyperparameters: Any) -> Method:
    """Build a method by name (baseline|csada|penalty|ap|sosr|reweight) with its hyperparameters."""
    if name == "csada":
        # Imported here because models.csada builds on this module's base class.
        from models.csada import CsadaConfig, CsadaMethod

        return CsadaMethod(cost_matrix=cost_matrix, config=CsadaConfig.from_dict(hyperparameters))
    if name not in _SIMPLE_METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    try:
        return _SIMPLE_METHODS[name](cost_matrix=cost_matrix, **hyperparameters)
    except TypeError as error:
        raise ValueError(f"bad hyperparameters for {name!r}: {error}") from None
