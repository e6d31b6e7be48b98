"""Algorithm 1 of the paper: targeted projected gradient ascent with rejection, batched.

Two implementations with the same signature and bit-for-bit the same results:

* `reference_attack` follows the paper's pseudo-code literally: per ascent step, one forward and
  backward pass for the gradient of log p_target, then a separate forward pass to check the new
  prediction (two forwards and one backward per step).
* `targeted_attack` is fused: the forward pass on the candidate x + delta_k gives both step k's
  prediction (accept / reject / success) and, through its backward pass, the gradient at delta_k
  that step k+1 needs. That is one forward and one backward per step, plus the initial forward,
  which also yields the first gradient. The backward is skipped where no sample will use it (last
  step, or nobody left active).

Why the two agree bitwise: every forward pass of both runs on the full batch, with rows in fixed
positions, so every pass has the same shape (kernel choice and reduction order may depend on the
batch size, never on other rows' values in eval mode). A row that is finished just carries its final
perturbation along. A rejected row keeps its previous iterate, so the fused version keeps the gradient
it already computed there, which is the one the reference recomputes.

Per-sample outcome codes: SKIPPED (the model did not predict the true class at the start, or the
target is the true class; delta = 0), SUCCESS (prediction reached the target; stopped there),
EXHAUSTED (used all K steps), REJECTED (stopped at a rejected step; only with on_reject="stop").
A rejected step (prediction lands on a third class) is undone. With on_reject="stay" (the authors'
code, the default) the sample stays active and tries again from the same iterate; with "stop" it
ends there, as in the pseudo-code's "Output delta^(k-1)". Ascent from an unchanged iterate is
deterministic, so both give the same perturbation; "stop" just does less work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

SKIPPED = 0
SUCCESS = 1
EXHAUSTED = 2
REJECTED = 3
OUTCOME_NAMES = {SKIPPED: "skipped", SUCCESS: "success", EXHAUSTED: "exhausted", REJECTED: "rejected"}

Norm = Literal["linf", "l2"]
OnReject = Literal["stay", "stop"]
Clamp = tuple[float | Tensor, float | Tensor] | None


@dataclass(frozen=True)
class AttackResult:
    """Perturbations and per-sample bookkeeping of one batched attack."""

    delta: Tensor  # same shape as x; zero for skipped samples
    outcome: Tensor  # (B,) int64 outcome codes
    rejected_steps: Tensor  # (B,) int64: steps whose candidate landed on a third class
    steps_active: Tensor  # (B,) int64: ascent steps taken while the sample was active
    initial_prediction: Tensor  # (B,) int64: the model's prediction on the clean input
    steps_run: int  # batched ascent iterations executed (the loop ends early when nobody is active)
    forward_passes: int
    backward_passes: int

    @property
    def attacked(self) -> Tensor:
        """(B,) bool: the samples that were attacked (not skipped)."""
        return self.outcome != SKIPPED

    @property
    def num_attacked(self) -> int:
        """How many samples were attacked."""
        return int(self.attacked.sum())

    @property
    def num_success(self) -> int:
        """How many attacked samples reached their target."""
        return int((self.outcome == SUCCESS).sum())

    @property
    def success_rate(self) -> float:
        """Successes over attacked samples (0.0 when none was attacked)."""
        attacked = self.num_attacked
        return self.num_success / attacked if attacked else 0.0

    @property
    def mean_active_steps(self) -> float:
        """Mean number of ascent steps per attacked sample (0.0 when none was attacked)."""
        attacked = self.attacked
        if not bool(attacked.any()):
            return 0.0
        return float(self.steps_active[attacked].double().mean())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (frozen BN stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def targeted_attack(model: nn.Module, x: Tensor, y: Tensor, target: int | Tensor, *, eps: float,
                    steps: int, step_size: float, norm: Norm = "linf", sign: bool = False,
                    clamp: Clamp = None, on_reject: OnReject = "stay") -> AttackResult:
    """Fused Algorithm 1: one forward and one backward pass per ascent step."""
    x, y, target = _check_inputs(x, y, target, eps=eps, steps=steps, norm=norm, on_reject=on_reject)
    state = _State(x, y, target, on_reject=on_reject)
    with eval_mode(model), torch.enable_grad():
        inputs, logits = _forward(model, x + state.delta)
        state.forward_passes += 1
        state.start(logits.argmax(dim=1))
        grad = _input_grad(inputs, logits, target) if steps > 0 and state.any_active() else None
        state.backward_passes += grad is not None
        for step in range(steps):
            if grad is None or not state.any_active():
                break
            candidate = _candidate(x, state.delta, grad, state.active, eps=eps, step_size=step_size,
                                   norm=norm, sign=sign, clamp=clamp)
            last = step == steps - 1
            if last:
                with torch.no_grad():
                    inputs, logits = _forward(model, x + candidate)
            else:
                inputs, logits = _forward(model, x + candidate)
            state.forward_passes += 1
            accepted = state.update(candidate, logits.argmax(dim=1))
            if last or not state.any_active():
                break
            candidate_grad = _input_grad(inputs, logits, target)
            state.backward_passes += 1
            # Accepted rows now sit at the candidate; rejected rows stay where their gradient was taken.
            grad = torch.where(_rows(accepted, grad), candidate_grad, grad)
    return state.result()


def reference_attack(model: nn.Module, x: Tensor, y: Tensor, target: int | Tensor, *, eps: float,
                     steps: int, step_size: float, norm: Norm = "linf", sign: bool = False,
                     clamp: Clamp = None, on_reject: OnReject = "stay") -> AttackResult:
    """Algorithm 1 as written in the paper: a separate forward pass checks every ascent step."""
    x, y, target = _check_inputs(x, y, target, eps=eps, steps=steps, norm=norm, on_reject=on_reject)
    state = _State(x, y, target, on_reject=on_reject)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits = model(x + state.delta)
        state.forward_passes += 1
        state.start(logits.argmax(dim=1))
        for _ in range(steps):
            if not state.any_active():
                break
            inputs, logits = _forward(model, x + state.delta)
            grad = _input_grad(inputs, logits, target)
            state.forward_passes += 1
            state.backward_passes += 1
            candidate = _candidate(x, state.delta, grad, state.active, eps=eps, step_size=step_size,
                                   norm=norm, sign=sign, clamp=clamp)
            with torch.no_grad():
                prediction = model(x + candidate).argmax(dim=1)
            state.forward_passes += 1
            state.update(candidate, prediction)
    return state.result()


def project(delta: Tensor, *, eps: float, norm: Norm) -> Tensor:
    """Project each sample's perturbation onto the eps-ball (L-inf: clamp; L2: rescale)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1)
    factor = (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


class _State:
    """Per-sample state shared by both implementations, so their bookkeeping cannot drift apart."""

    def __init__(self, x: Tensor, y: Tensor, target: Tensor, *, on_reject: OnReject) -> None:
        self.y = y
        self.target = target
        self.on_reject = on_reject
        self.delta = torch.zeros_like(x)
        batch = x.shape[0]
        self.active = torch.zeros(batch, dtype=torch.bool, device=x.device)
        self.outcome = torch.full((batch,), SKIPPED, dtype=torch.long, device=x.device)
        self.rejected = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.steps_active = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.initial = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.steps_run = 0
        self.forward_passes = 0
        self.backward_passes = 0

    def start(self, prediction: Tensor) -> None:
        self.initial = prediction
        self.active = (prediction == self.y) & (self.target != self.y)
        self.outcome = torch.where(self.active, EXHAUSTED, SKIPPED)

    def any_active(self) -> bool:
        return bool(self.active.any())

    def update(self, candidate: Tensor, prediction: Tensor) -> Tensor:
        """Apply one checked step; returns the rows whose candidate was accepted."""
        self.steps_run += 1
        on_path = (prediction == self.y) | (prediction == self.target)
        accepted = self.active & on_path
        rejected = self.active & ~on_path
        success = self.active & (prediction == self.target)
        self.delta = torch.where(_rows(accepted, self.delta), candidate, self.delta)
        self.steps_active += self.active.long()
        self.rejected += rejected.long()
        self.outcome = torch.where(success, SUCCESS, self.outcome)
        self.active = self.active & ~success
        if self.on_reject == "stop":
            self.outcome = torch.where(rejected, REJECTED, self.outcome)
            self.active = self.active & ~rejected
        return accepted

    def result(self) -> AttackResult:
        return AttackResult(delta=self.delta.detach(), outcome=self.outcome, rejected_steps=self.rejected,
                            steps_active=self.steps_active, initial_prediction=self.initial,
                            steps_run=self.steps_run, forward_passes=self.forward_passes,
                            backward_passes=self.backward_passes)


def _check_inputs(x: Tensor, y: Tensor, target: int | Tensor, *, eps: float, steps: int, norm: str,
                  on_reject: str) -> tuple[Tensor, Tensor, Tensor]:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2' (got {norm!r})")
    if on_reject not in ("stay", "stop"):
        raise ValueError(f"on_reject must be 'stay' or 'stop' (got {on_reject!r})")
    if eps < 0 or steps < 0:
        raise ValueError("eps and steps must be non-negative")
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (B, ...) and y (B,); got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(device=x.device, dtype=torch.long)
    if isinstance(target, Tensor):
        target = target.to(device=x.device, dtype=torch.long).expand(x.shape[0]).clone()
    else:
        target = torch.full_like(y, int(target))
    return x.detach(), y, target


def _forward(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    inputs = inputs.detach().requires_grad_(torch.is_grad_enabled())
    return inputs, model(inputs)


def _input_grad(inputs: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """Gradient of sum_i log softmax(logits_i)[target_i] with respect to the input only."""
    objective = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(objective, inputs)
    return grad


def _candidate(x: Tensor, delta: Tensor, grad: Tensor, active: Tensor, *, eps: float, step_size: float,
               norm: Norm, sign: bool, clamp: Clamp) -> Tensor:
    """The projected ascent step from `delta` for active rows; other rows keep `delta`."""
    direction = grad.sign() if sign else grad
    candidate = delta + step_size * direction
    if clamp is not None:
        # Clamp to the valid range first: projecting afterwards shrinks toward x, which stays valid.
        low, high = clamp
        if isinstance(low, Tensor) or isinstance(high, Tensor):
            low_t, high_t = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (low, high))
            candidate = torch.clamp(x + candidate, low_t, high_t) - x
        else:
            candidate = torch.clamp(x + candidate, float(low), float(high)) - x
    candidate = project(candidate, eps=eps, norm=norm)
    return torch.where(_rows(active, delta), candidate, delta)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))
