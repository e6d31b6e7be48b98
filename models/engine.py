"""The training loop every method shares: `fit(...)` over epochs and `train_one_epoch(...)`.

Reproducibility and resume: `fit` seeds everything from `TrainConfig.seed` on a fresh start. After
each epoch `on_epoch_end` receives a `TrainingState` (model, optimizer, scheduler, grad scaler, every
RNG and the sampler position). Passing it back as `resume_state` continues with the next epoch and,
on the CPU, reproduces the uninterrupted run bit for bit. A job stopped mid-epoch restarts that epoch
from the last epoch state: the epoch's batch order is a function of (seed, epoch) through
`EpochShuffleSampler` (or of the restored torch RNG with a plain shuffling loader), and CSADA's pair
draws are a function of (seed, epoch) too.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from models.evaluate import evaluate
from models.methods import Method, find_head
from models.runtime import autocast_context, create_grad_scaler, seed_everything

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    scheduler: Literal["none", "cosine", "step"] = "none"
    lr_step_epochs: int = 10  # "step": multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = 0.33
    freeze_bn: bool = False  # keep BatchNorm in eval mode while training (the authors' CSADA code)
    amp: bool = True  # autocast on CUDA; no effect on the CPU
    seed: int = 0
    head_only_epochs: int = 0  # the PMI recipe: train only the final layer for the first epochs
    head_lr: float | None = None  # lr during the head-only epochs (None: lr)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs >= 0, batch_size >= 1, lr > 0 and weight_decay >= 0 are required")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd' (got {self.optimizer!r})")
        if self.scheduler not in ("none", "cosine", "step"):
            raise ValueError(f"scheduler must be 'none', 'cosine' or 'step' (got {self.scheduler!r})")
        if not 0 <= self.head_only_epochs <= self.epochs:
            raise ValueError("head_only_epochs must be between 0 and epochs")
        if self.lr_step_epochs < 1 or self.lr_gamma <= 0:
            raise ValueError("lr_step_epochs >= 1 and lr_gamma > 0 are required")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")


@dataclass(frozen=True)
class ProgressEvent:
    """One training step done: `step` counts from 1 within the epoch; `epoch` from 0."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    attack_success_rate: float | None
    elapsed_s: float


class TrainingState(TypedDict):
    """Everything needed to continue after a finished epoch; a plain dict for torch.save/torch.load."""

    format: int
    epoch: int  # epochs completed; training resumes with this epoch index
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    sampler: dict[str, int]
    history: list[dict[str, Any]]
    method: dict[str, Any]
    config: dict[str, Any]


@dataclass
class EpochSummary:
    """Totals of one (possibly interrupted) epoch."""

    epoch: int
    steps: int = 0
    loss_sum: float = 0.0
    attacked: int = 0
    successes: int = 0
    active_steps: int = 0
    attack_steps_run: int = 0
    stopped: bool = False
    lr: float = 0.0

    def as_record(self) -> dict[str, Any]:
        """The epoch's history entry."""
        return {"epoch": self.epoch, "steps": self.steps, "lr": self.lr,
                "loss": self.loss_sum / self.steps if self.steps else math.nan,
                "attack_success_rate": self.successes / self.attacked if self.attacked else None,
                "attack_mean_active_steps": self.active_steps / self.attacked if self.attacked else None,
                "attack_mean_steps_run": self.attack_steps_run / self.steps if self.attacked else None}


@dataclass
class FitResult:
    """What `fit` did: epochs run in this call, whether it was stopped, and the per-epoch history."""

    epochs_run: int
    epochs_completed: int
    stopped: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    mean_attack_active_steps: float | None = None  # per attacked sample, over this call's steps
    mean_attack_steps_run: float | None = None  # batched ascent iterations per training step


class EpochShuffleSampler(Sampler[int]):
    """A shuffling sampler whose order is a pure function of (seed, epoch); `fit` calls set_epoch."""

    def __init__(self, size: int, *, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


def create_train_loader(dataset: Dataset[Any], *, batch_size: int, seed: int, num_workers: int = 0,
                        drop_last: bool = False, pin_memory: bool = False) -> DataLoader[Any]:
    """A training DataLoader with a deterministic per-epoch shuffle (needed for exact resume)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), seed=seed),  # type: ignore[arg-type]
                      num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=False)


def fit(model: nn.Module, *, train_loader: DataLoader[Any], method: Method, config: TrainConfig,
        device: torch.device | str, progress: Callable[[ProgressEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None, resume_state: TrainingState | None = None,
        on_epoch_end: Callable[[TrainingState], None] | None = None,
        valid_loader: DataLoader[Any] | None = None) -> FitResult:
    """Train `model` with `method` for `config.epochs` epochs (or continue from `resume_state`)."""
    device = torch.device(device)
    model.to(device)
    if resume_state is None:
        seed_everything(config.seed)
        method.prepare_model(model)
    method.setup(train_dataset=train_loader.dataset)
    optimizer = _build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    scaler = create_grad_scaler(device, enabled=config.amp)
    start_epoch, history = 0, list[dict[str, Any]]()
    if resume_state is not None:
        start_epoch, history = _restore(resume_state, model=model, optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, method=method)
    started_at = time.monotonic()
    totals = EpochSummary(epoch=-1)
    epochs_run, stopped = 0, False
    for epoch in range(start_epoch, config.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        summary = train_one_epoch(model, loader=train_loader, method=method, optimizer=optimizer,
                                  device=device, epoch=epoch, config=config, scaler=scaler,
                                  progress=progress, should_stop=should_stop, started_at=started_at)
        for name in ("steps", "attacked", "successes", "active_steps", "attack_steps_run"):
            setattr(totals, name, getattr(totals, name) + getattr(summary, name))
        if summary.stopped:
            stopped = True
            logger.info("training stopped during epoch %d after %d steps", epoch, summary.steps)
            break
        scheduler.step()
        record = summary.as_record()
        if valid_loader is not None:
            record.update({f"valid_{k}": v for k, v in
                           evaluate_split(model, loader=valid_loader, method=method, device=device).items()})
        history.append(record)
        epochs_run += 1
        logger.info("epoch %d/%d: %s", epoch + 1, config.epochs, record)
        if on_epoch_end is not None:
            on_epoch_end(_snapshot(epoch=epoch + 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, history=history, method=method, config=config))
    return FitResult(epochs_run=epochs_run, epochs_completed=start_epoch + epochs_run, stopped=stopped,
                     history=history,
                     mean_attack_active_steps=(totals.active_steps / totals.attacked if totals.attacked else None),
                     mean_attack_steps_run=(totals.attack_steps_run / totals.steps if totals.attacked else None))


def train_one_epoch(model: nn.Module, *, loader: DataLoader[Any], method: Method,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, config: TrainConfig,
                    scaler: Any | None = None, progress: Callable[[ProgressEvent], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    started_at: float | None = None) -> EpochSummary:
    """One pass over `loader`; polls `should_stop` before every step and stops cleanly when it says so."""
    started_at = time.monotonic() if started_at is None else started_at
    steps = len(loader)
    batch_size = loader.batch_size or config.batch_size
    stream = method.epoch_stream(epoch=epoch, seed=config.seed, steps=steps, batch_size=batch_size,
                                 loader=loader)
    extras: Iterator[Any] = iter(stream) if stream is not None else iter(())
    summary = EpochSummary(epoch=epoch, lr=float(optimizer.param_groups[0]["lr"]))
    head_only = epoch < config.head_only_epochs
    with _TrainingMode(model, freeze_bn=config.freeze_bn, head_only=head_only):
        for step, (x, y) in enumerate(loader, start=1):
            if should_stop is not None and should_stop():
                summary.stopped = True
                break
            extra = next(extras) if stream is not None else None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, enabled=config.amp):
                output = method.compute_loss(model, x, y, extra=extra)
            if scaler is not None:
                scaler.scale(output.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                output.loss.backward()
                optimizer.step()
            loss = float(output.loss.detach())
            summary.steps += 1
            summary.loss_sum += loss
            rate = None
            if output.attack is not None:
                summary.attacked += output.attack.attacked
                summary.successes += output.attack.successes
                summary.active_steps += output.attack.active_steps
                summary.attack_steps_run += output.attack.steps_run
                rate = output.attack.success_rate
            if progress is not None:
                progress(ProgressEvent(epoch=epoch, epochs=config.epochs, step=step, steps_per_epoch=steps,
                                       loss=loss, attack_success_rate=rate,
                                       elapsed_s=time.monotonic() - started_at))
    return summary


def evaluate_split(model: nn.Module, *, loader: DataLoader[Any], method: Method,
                   device: torch.device) -> dict[str, float]:
    """Accuracy, WER (mean cost per prediction), total cost and size of a split, predicting as `method` does."""
    report = evaluate(model, loader, cost_matrix=method.cost_matrix, device=device,
                      output_kind=method.output_kind).report
    return {key: report[key] for key in ("accuracy", "wer", "total_cost", "n")}


class _TrainingMode:
    """Train mode, with BN frozen if asked; head-only epochs also freeze every parameter but the head."""

    def __init__(self, model: nn.Module, *, freeze_bn: bool, head_only: bool) -> None:
        self.model, self.freeze_bn, self.head_only = model, freeze_bn, head_only
        self.flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self.model.train()
        if self.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if self.head_only:
            head = find_head(self.model)
            head_params = {id(p) for p in head.parameters()}
            for module in self.model.modules():
                if module is not head:
                    module.eval()  # the frozen body's BN statistics must not drift either
            head.train()
            self.flags = [(p, p.requires_grad) for p in self.model.parameters() if id(p) not in head_params]
            for parameter, _ in self.flags:
                parameter.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)
        self.flags = []


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The lr multiplier per epoch index: head_lr/lr in head-only epochs, then the chosen schedule."""
    head_factor = (config.head_lr / config.lr) if config.head_lr is not None else 1.0
    body_epochs = max(config.epochs - config.head_only_epochs, 1)

    def factor(epoch: int) -> float:
        if epoch < config.head_only_epochs:
            return head_factor
        done = epoch - config.head_only_epochs
        if config.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, body_epochs) / body_epochs))
        if config.scheduler == "step":
            return float(config.lr_gamma ** (done // config.lr_step_epochs))
        return 1.0

    return factor


def _snapshot(*, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              scaler: Any | None, history: list[dict[str, Any]], method: Method,
              config: TrainConfig) -> TrainingState:
    """A detached CPU copy of the training state, safe to keep while training goes on."""
    return TrainingState(
        format=STATE_FORMAT, epoch=epoch,
        model={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        optimizer=_to_cpu(copy.deepcopy(optimizer.state_dict())),
        scheduler=copy.deepcopy(scheduler.state_dict()),
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=_rng_state(), sampler={"seed": config.seed, "epoch": epoch},
        history=copy.deepcopy(history), method={"name": method.name, "hyperparameters": method.hyperparameters()},
        config=asdict(config))


def _restore(state: TrainingState, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: Any | None, method: Method) -> tuple[int, list[dict[str, Any]]]:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unsupported training-state format {state.get('format')!r}")
    if state["method"]["name"] != method.name:
        raise ValueError(f"the state was saved by method {state['method']['name']!r}, not {method.name!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["epoch"]), copy.deepcopy(list(state["history"]))


def _rng_state() -> dict[str, Any]:
    _, keys, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Tensors and plain numbers only, so torch.load(weights_only=True) accepts the state.
            "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
