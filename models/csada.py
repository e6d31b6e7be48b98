"""CSADA training: Algorithm 2 (all pairs) and Algorithm 3 (one sampled pair per step).

The augmented objective, eq. (5) of the paper, with c~(a, b) = c(a, b)^tau / sum c^tau:

    L(theta) = 1/N sum_i [ CE(x_i, y_i) + lambda * sum_z c~(y_i, z) CE(x_i + delta_i^(y_i, z), y_i) ]

where delta_i^(y, z) comes from Algorithm 1 (`models.attacks`), and is 0 for a sample the model gets
wrong at the start. Grouping the adversarial part by pair, with pi_a = N_a / N the share of class a in
the training set and m_ab the mean over class-a samples of CE(x + delta^(a, b), a):

    A(theta) = lambda * sum_(a,b) c~(a, b) * pi_a * m_ab.

Full (Algorithm 2, `stochastic=False`): every sample of the batch is attacked towards every class z
with c~(y_i, z) > 0, and the batch estimate is lambda / |B| * sum_i sum_z c~(y_i, z) CE_iz. That is
(K - 1) attacks per sample, so one epoch costs about K - 1 times a stochastic one and the number of
attacked (sample, pair) rows grows with the number of pairs, i.e. with K^2 over the whole problem.

Stochastic (Algorithm 3, `stochastic=True`): each step samples one pair (a, b) with probability
q(a, b) = c~(a, b) over the pairs whose source class has training samples, then draws M samples of
class a through a per-class index of the training set (uniformly, without replacement when the
class has at least M samples; M defaults to the batch size). The adversarial term of the step is

    lambda * w(a, b) * mean_{j=1..M} CE(x_j + delta_j^(a, b), a),   w(a, b) = c~(a, b) * pi_a / q(a, b).

Unbiasedness: the per-class draw makes the mean an unbiased estimate of m_ab, and importance sampling
gives E_q[w * m_ab] = sum_(a,b) q(a,b) * c~(a,b) pi_a / q(a,b) * m_ab = sum c~(a,b) pi_a m_ab, so the
step's loss estimates L(theta) without bias (the clean term is the usual batch mean). Since q = c~
restricted to classes present (q = c~ / Z with Z = the c~-mass of those pairs, 1 when every class
has samples), w(a, b) = Z * pi_a, i.e. simply the share of class a. The paper's Algorithm 3 attacks the
class-a samples that happen to be in the batch, which has the same expectation (about pi_a * |B| of
them, averaged over |B|) but no adversarial term at all whenever the batch holds no class-a sample;
drawing from the class index puts one in every step. Samples that Algorithm 1 skips stay in the mean
with delta = 0, as in eq. (5); averaging over attacked samples only would bias the estimate.

`pairs_per_step` = P > 1 draws P pairs independently per step (M = batch size / P rows each by
default, so the attack cost stays that of one batch) and averages their terms, each row weighing
w(a, b) / (P * M): still unbiased, with P times less pair-sampling variance. This matters with
Adam, which rescales each step's gradient, so a single noisy pair per step moves the weights as
much as the whole objective would. A 3-seed check on sklearn digits (interpolating MLP, Pareto costs,
L2 eps 1, tau 1, Adam lr 1e-4, 10 epochs) gave mean test cost over baseline of 0.98-1.12 with P = 1,
0.75-0.84 with P = 16 and 0.65 with Algorithm 2.

The clean and adversarial inputs go through the model in one forward pass (one batch-norm batch when
BN is not frozen, and one backward pass).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from models.attacks import AttackResult, Norm, OnReject, targeted_attack
from models.costs import CostMatrix
from models.methods import AttackStats, LossOutput, Method

logger = logging.getLogger(__name__)

# Separates the pair draws' random stream from any other stream seeded with (seed, epoch).
_STREAM_TAG = 0xC5ADA


@dataclass(frozen=True)
class CsadaConfig:
    """CSADA hyperparameters (defaults: the paper's CIFAR-10 settings, section 5.2)."""

    lam: float = 2.0  # lambda, weight of the adversarial term
    eps: float = 1.0  # radius of the perturbation ball
    steps: int = 10  # K, ascent steps of Algorithm 1
    step_size: float = 5e-4  # eta_2, ascent step size
    tau: float = 3.0  # temperature of c~ = c^tau / sum c^tau
    norm: Norm = "linf"
    sign: bool = False  # sign-gradient ascent instead of the paper's raw gradient
    # Valid input range, or None (the authors' code): (low, high) for every input value, or per-channel
    # ((low_c, ...), (high_c, ...)), which normalised images need: `models.transforms.pixel_range`.
    clamp: ClampBounds | None = None
    stochastic: bool = True  # Algorithm 3 (one pair per step) instead of Algorithm 2 (all pairs)
    on_reject: OnReject = "stay"  # a rejected sample keeps trying ("stay") or ends ("stop")
    attack_batch_size: int | None = None  # M, draws per sampled pair; None: batch size / pairs_per_step
    pairs_per_step: int = 1  # P, pairs sampled per step (Algorithm 3 has 1; more lowers the variance)
    # "float32": a CSADA step (Algorithm 1 and the clean + adversarial forward) runs in float32 even under
    # the engine's autocast, because an ascent step of 1e-4 (the paper's eta_2) is far below bf16's resolution
    # (about 0.008 at a normalised pixel value of 2): rounded, x + delta is mostly x again. "autocast": the
    # caller's autocast applies (faster on a GPU; only sign steps well above that resolution survive it).
    attack_precision: AttackPrecision = "float32"

    def __post_init__(self) -> None:
        if self.lam < 0 or self.eps < 0 or self.steps < 0 or self.step_size < 0 or self.tau < 0:
            raise ValueError("lam, eps, steps, step_size and tau must be non-negative")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2' (got {self.norm!r})")
        if self.on_reject not in ("stay", "stop"):
            raise ValueError(f"on_reject must be 'stay' or 'stop' (got {self.on_reject!r})")
        if self.attack_batch_size is not None and self.attack_batch_size < 1:
            raise ValueError("attack_batch_size must be >= 1")
        if self.pairs_per_step < 1:
            raise ValueError("pairs_per_step must be >= 1")
        if self.attack_precision not in ("float32", "autocast"):
            raise ValueError(f"attack_precision must be 'float32' or 'autocast' (got {self.attack_precision!r})")
        if self.clamp is not None:
            object.__setattr__(self, "clamp", _clamp_bounds(self.clamp))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CsadaConfig:
        """Build from keyword hyperparameters; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CSADA hyperparameters: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        values = asdict(self)
        values["clamp"] = [list(b) if isinstance(b, tuple) else b for b in self.clamp] if self.clamp else None
        return values

    def clamp_for(self, x: Tensor) -> tuple[float | Tensor, float | Tensor] | None:
        """`clamp` as Algorithm 1 takes it for inputs like `x`: per-channel bounds broadcast over dim 1."""
        if self.clamp is None or not isinstance(self.clamp[0], tuple):
            return self.clamp  # type: ignore[return-value]
        if x.dim() < 2 or x.shape[1] != len(self.clamp[0]):
            raise ValueError(f"clamp has bounds for {len(self.clamp[0])} channels but the inputs have shape "
                             f"{tuple(x.shape)}")
        shape = (-1, *([1] * (x.dim() - 2)))
        low, high = (torch.tensor(b, dtype=x.dtype, device=x.device).view(shape) for b in self.clamp)
        return low, high


ClampBounds = tuple[float, float] | tuple[tuple[float, ...], tuple[float, ...]]
AttackPrecision = Literal["float32", "autocast"]


def _clamp_bounds(value: Any) -> ClampBounds:
    """(low, high) as floats, or as equal-length tuples of per-channel floats; low < high everywhere."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"clamp must be (low, high) (got {value!r})")
    low, high = value
    if isinstance(low, (tuple, list)) or isinstance(high, (tuple, list)):
        if not (isinstance(low, (tuple, list)) and isinstance(high, (tuple, list))) or len(low) != len(high) or not low:
            raise ValueError("per-channel clamp bounds must be two non-empty lists of the same length")
        lows, highs = tuple(float(v) for v in low), tuple(float(v) for v in high)
        if not all(a < b for a, b in zip(lows, highs, strict=True)):
            raise ValueError(f"clamp needs low < high in every channel (got {lows} and {highs})")
        return lows, highs
    bounds = (float(low), float(high))
    if not bounds[0] < bounds[1]:
        raise ValueError(f"clamp needs low < high (got {bounds})")
    return bounds


class PairSampler:
    """Samples (a, b) with probability c~ and class-a training indices; gives the unbiased weight."""

    def __init__(self, *, tempered: np.ndarray, labels: np.ndarray) -> None:
        k = tempered.shape[0]
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        if counts.shape[0] != k:
            raise ValueError(f"labels go up to {counts.shape[0] - 1} but the cost matrix has {k} classes")
        self.share = counts / counts.sum()
        self.members = [np.flatnonzero(labels == a) for a in range(k)]
        # Pairs whose source class has no training sample carry zero weight in eq. (5): drop them.
        allowed = tempered * (counts > 0)[:, None]
        mass = allowed.sum()
        if mass <= 0:
            raise ValueError("no pair with a positive cost has a source class present in the training set")
        self.c_tilde = tempered
        self.probabilities = allowed / mass
        # w = c~ * pi_a / q with q = c~ / mass, i.e. mass * pi_a (= pi_a when every class is present).
        self.weights = np.where(self.probabilities > 0, mass * self.share[:, None], 0.0)

    def draw(self, rng: np.random.Generator, *, size: int) -> tuple[int, int, float, np.ndarray]:
        """One pair (a, b), its weight w(a, b) and `size` indices of class-a samples."""
        k = self.probabilities.shape[0]
        flat = int(rng.choice(k * k, p=self.probabilities.ravel()))
        a, b = divmod(flat, k)
        members = self.members[a]
        indices = rng.choice(members, size=size, replace=size > members.size)
        return a, b, float(self.weights[a, b]), indices

    def schedule(self, *, seed: int, epoch: int, steps: int, size: int,
                 pairs: int = 1) -> list[list[tuple[int, int, float, np.ndarray]]]:
        """The epoch's draws (`pairs` per step), a pure function of (seed, epoch): a resumed epoch repeats them."""
        rng = np.random.default_rng([seed, epoch, _STREAM_TAG])
        return [[self.draw(rng, size=size) for _ in range(pairs)] for _ in range(steps)]


@dataclass(frozen=True)
class AdversarialDraw:
    """One step's attacked rows (stochastic CSADA): inputs, labels, and per-row target and loss weight."""

    pairs: tuple[tuple[int, int], ...]  # the sampled (a, b) pairs
    x: Tensor
    y: Tensor
    target: Tensor  # (rows,) the pair's b for each row
    weight: Tensor  # (rows,) w(a, b) / (pairs * M): the rows' weighted CE sums to the unbiased estimate

    @classmethod
    def from_pairs(cls, draws: Sequence[tuple[int, int, float, np.ndarray]], x: Tensor, y: Tensor) -> AdversarialDraw:
        """Assemble from `PairSampler.draw` results and the loaded rows, in the same order."""
        targets = [torch.full((len(idx),), b, dtype=torch.long) for _, b, _, idx in draws]
        weights = [torch.full((len(idx),), w / (len(draws) * len(idx))) for _, _, w, idx in draws]
        return cls(pairs=tuple((a, b) for a, b, _, _ in draws), x=x, y=y, target=torch.cat(targets),
                   weight=torch.cat(weights))


class CsadaMethod(Method):
    """CSADA fine-tuning (Algorithms 2 and 3); see the module docstring for the weighting."""

    name = "csada"

    def __init__(self, *, cost_matrix: CostMatrix, config: CsadaConfig) -> None:
        super().__init__(cost_matrix=cost_matrix)
        self.config = config
        self.tempered = cost_matrix.tempered(config.tau)
        self.sampler: PairSampler | None = None
        self.dataset: Dataset[Any] | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """The CsadaConfig as plain values."""
        return self.config.to_dict()

    def setup(self, *, train_dataset: Dataset[Any]) -> None:
        """Build the per-class index of the training set (stochastic version only)."""
        if not self.config.stochastic:
            return
        self.dataset = train_dataset
        self.sampler = PairSampler(tempered=self.tempered, labels=dataset_labels(train_dataset))

    def epoch_stream(self, *, epoch: int, seed: int, steps: int, batch_size: int,
                     loader: Any) -> Iterable[Any] | None:
        """Per step: an AdversarialDraw of the sampled pairs' source-class rows, loaded like the batches."""
        if not self.config.stochastic:
            return None
        if self.sampler is None or self.dataset is None:
            raise RuntimeError("CsadaMethod.setup(train_dataset=...) must run before training")
        pairs = self.config.pairs_per_step
        size = self.config.attack_batch_size or max(1, -(-batch_size // pairs))
        plan = self.sampler.schedule(seed=seed, epoch=epoch, steps=steps, size=size, pairs=pairs)
        batches = DataLoader(self.dataset,
                             batch_sampler=[np.concatenate([d[3] for d in step]).tolist() for step in plan],
                             num_workers=getattr(loader, "num_workers", 0),
                             collate_fn=getattr(loader, "collate_fn", None),
                             pin_memory=getattr(loader, "pin_memory", False))
        return _zip_plan(plan, batches)

    def compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any = None) -> LossOutput:
        """Clean CE plus lambda times the weighted adversarial CE (one sampled pair, or all pairs), in the
        precision `attack_precision` says."""
        keep_autocast = self.config.attack_precision == "autocast" or not torch.is_autocast_enabled(x.device.type)
        with contextlib.nullcontext() if keep_autocast else torch.autocast(x.device.type, enabled=False):
            return self._compute_loss(model, x, y, extra=extra)

    def _compute_loss(self, model: nn.Module, x: Tensor, y: Tensor, *, extra: Any) -> LossOutput:
        if self.config.stochastic:
            if extra is None:
                raise RuntimeError("stochastic CSADA needs the epoch stream's class-a draws")
            draw: AdversarialDraw = extra
            x_a, y_a = draw.x.to(x.device, non_blocking=True), draw.y.to(x.device, non_blocking=True)
            result = self._attack(model, x_a, y_a, draw.target.to(x.device))
            return self._loss(model, x, y, x_a + result.delta, y_a, draw.weight.to(x.device), [result])
        costs = torch.as_tensor(self.tempered, dtype=torch.float32, device=x.device)
        rows, targets = torch.nonzero(costs[y] > 0, as_tuple=True)
        if rows.numel() == 0:
            return LossOutput(F.cross_entropy(model(x).float(), y), AttackStats(0, 0, 0, 0))
        x_rows, y_rows = x[rows], y[rows]
        chunk = self.config.attack_batch_size or x.shape[0]
        results = [self._attack(model, x_rows[i:i + chunk], y_rows[i:i + chunk], targets[i:i + chunk])
                   for i in range(0, rows.numel(), chunk)]
        delta = torch.cat([r.delta for r in results])
        row_weights = costs[y_rows, targets] / x.shape[0]
        return self._loss(model, x, y, x_rows + delta, y_rows, row_weights, results)

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor) -> AttackResult:
        c = self.config
        return targeted_attack(model, x, y, target, eps=c.eps, steps=c.steps, step_size=c.step_size,
                               norm=c.norm, sign=c.sign, clamp=c.clamp_for(x), on_reject=c.on_reject)

    def _loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, y_adv: Tensor, row_weights: Tensor,
              results: Sequence[AttackResult]) -> LossOutput:
        logits = model(torch.cat([x, x_adv.detach()])).float()
        clean = F.cross_entropy(logits[: x.shape[0]], y)
        adversarial = (row_weights * F.cross_entropy(logits[x.shape[0]:], y_adv, reduction="none")).sum()
        stats = AttackStats(attacked=sum(r.num_attacked for r in results),
                            successes=sum(r.num_success for r in results),
                            active_steps=sum(int(r.steps_active.sum()) for r in results),
                            steps_run=sum(r.steps_run for r in results))
        return LossOutput(clean + self.config.lam * adversarial, stats)


def _zip_plan(plan: list[list[tuple[int, int, float, np.ndarray]]],
              batches: DataLoader[Any]) -> Iterator[AdversarialDraw]:
    for draws, batch in zip(plan, batches, strict=True):
        yield AdversarialDraw.from_pairs(draws, batch[0], batch[1])


def dataset_labels(dataset: Dataset[Any]) -> np.ndarray:
    """Integer labels of a dataset, from `targets`/`labels` or the known wrappers; else by iterating."""
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return _as_int_array(values)
    if isinstance(dataset, TensorDataset):
        return _as_int_array(dataset.tensors[-1])
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([dataset_labels(part) for part in dataset.datasets])
    logger.warning("dataset %s exposes no labels; reading every item once to index classes",
                   type(dataset).__name__)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def _as_int_array(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)
