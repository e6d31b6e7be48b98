"""The training loop: loss goes down, cancel is prompt, resume is exact, BN freezing and head-only epochs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.costs import CostMatrix
from models.engine import (
    EpochShuffleSampler,
    ProgressEvent,
    TrainConfig,
    TrainingState,
    create_train_loader,
    fit,
)
from models.methods import create_method
from models.runtime import autocast_context, create_grad_scaler, seed_everything, select_device

CLASSES = ("a", "b", "c")


def blobs(seed: int = 0, n: int = 48) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    return TensorDataset(centres[y] + 1.2 * torch.randn(n, 2, generator=generator), y)


def net(seed: int) -> nn.Sequential:
    """BN (running statistics) and dropout (consumes the torch RNG): both must survive a resume."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def matrix() -> CostMatrix:
    return CostMatrix.from_pairs(CLASSES, {("a", "b"): 6.0, ("c", "a"): 3.0})


def test_training_loss_decreases_on_a_toy_problem() -> None:
    result = fit(net(0), train_loader=create_train_loader(blobs(), batch_size=12, seed=0),
                 method=create_method("baseline", cost_matrix=matrix()),
                 config=TrainConfig(epochs=6, lr=0.02), device="cpu")
    losses = [record["loss"] for record in result.history]
    assert result.epochs_run == 6
    assert losses[-1] < 0.6 * losses[0]


def test_cancel_stops_at_the_next_step() -> None:
    polls: list[int] = []
    events: list[ProgressEvent] = []
    states: list[TrainingState] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) >= 6  # 4 steps in epoch 0, then 1 step in epoch 1, then stop

    result = fit(net(0), train_loader=create_train_loader(blobs(), batch_size=12, seed=0),
                 method=create_method("baseline", cost_matrix=matrix()), config=TrainConfig(epochs=5),
                 device="cpu", progress=events.append, should_stop=should_stop, on_epoch_end=states.append)
    assert result.stopped and result.epochs_run == 1 and result.epochs_completed == 1
    assert len(events) == 5 and (events[-1].epoch, events[-1].step) == (1, 1)
    assert len(states) == 1 and states[0]["epoch"] == 1


@pytest.mark.parametrize("loader_kind", ["epoch_sampler", "plain_shuffle"])
@pytest.mark.parametrize("method_name", ["csada", "ap"])
def test_resume_from_an_epoch_state_is_exact(loader_kind: str, method_name: str) -> None:
    data = blobs()

    def loader() -> DataLoader:
        if loader_kind == "epoch_sampler":
            return create_train_loader(data, batch_size=12, seed=3)
        return DataLoader(data, batch_size=12, shuffle=True)  # order from the (restored) torch RNG

    hyper = {"eps": 0.5, "steps": 3, "step_size": 0.3, "tau": 1.0} if method_name == "csada" else {}
    config = TrainConfig(epochs=3, lr=0.01, scheduler="cosine", seed=3)
    states: list[TrainingState] = []
    straight = net(0)
    fit(straight, train_loader=loader(), method=create_method(method_name, cost_matrix=matrix(), **hyper),
        config=config, device="cpu", on_epoch_end=states.append)
    assert [s["epoch"] for s in states] == [1, 2, 3]
    buffer = io.BytesIO()
    torch.save(states[0], buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # the state is plain data: no pickled classes
    resumed = net(99)  # different initial weights: everything must come from the state
    torch.manual_seed(12345)  # and a disturbed global RNG
    result = fit(resumed, train_loader=loader(), method=create_method(method_name, cost_matrix=matrix(), **hyper),
                 config=config, device="cpu", resume_state=saved)
    assert result.epochs_run == 2 and result.epochs_completed == 3
    assert [r["loss"] for r in result.history] == [s["loss"] for s in states[-1]["history"]]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_freeze_bn_keeps_batch_norm_in_eval_mode() -> None:
    model = net(0)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    seen: list[bool] = []
    bn.register_forward_hook(lambda module, *_: seen.append(module.training))
    assert bn.running_mean is not None
    running_mean = bn.running_mean.clone()
    fit(model, train_loader=create_train_loader(blobs(), batch_size=12, seed=0),
        method=create_method("csada", cost_matrix=matrix(), eps=0.5, steps=2, step_size=0.3),
        config=TrainConfig(epochs=1, freeze_bn=True), device="cpu")
    assert seen and not any(seen)
    assert torch.equal(model.state_dict()["1.running_mean"], running_mean)


def test_head_only_epochs_train_only_the_head() -> None:
    model = net(0)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("4.")}
    head = model.state_dict()["4.weight"].clone()
    lrs: list[float] = []
    fit(model, train_loader=create_train_loader(blobs(), batch_size=12, seed=0),
        method=create_method("baseline", cost_matrix=matrix()),
        config=TrainConfig(epochs=1, head_only_epochs=1, lr=1e-3, head_lr=1e-2), device="cpu",
        on_epoch_end=lambda state: lrs.append(state["history"][-1]["lr"]))
    for key, value in body.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.state_dict()["4.weight"], head)
    assert all(p.requires_grad for p in model.parameters())
    assert lrs == [pytest.approx(1e-2)]


def test_step_schedule_and_config_validation() -> None:
    result = fit(net(0), train_loader=create_train_loader(blobs(n=12), batch_size=12, seed=0),
                 method=create_method("baseline", cost_matrix=matrix()),
                 config=TrainConfig(epochs=4, lr=0.1, scheduler="step", lr_step_epochs=2, lr_gamma=0.5),
                 device="cpu")
    assert [r["lr"] for r in result.history] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    with pytest.raises(ValueError):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrainConfig(epochs=2, head_only_epochs=3)


def test_epoch_sampler_is_a_function_of_seed_and_epoch() -> None:
    sampler = EpochShuffleSampler(10, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(second) == list(range(10)) and second != first


def test_runtime_helpers_on_cpu() -> None:
    device = select_device("cpu")
    with autocast_context(device):
        assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")
    assert create_grad_scaler(device) is None
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    assert not math.isnan(float(a.sum()))
