"""Algorithm 1: ball constraint, rejection, stopping on success, and fused == reference bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models.attacks import (
    EXHAUSTED,
    REJECTED,
    SKIPPED,
    SUCCESS,
    AttackResult,
    eval_mode,
    project,
    reference_attack,
    targeted_attack,
)

FEW = settings(max_examples=12, deadline=None, derandomize=True)


def make_problem(seed: int, *, batch: int, features: int = 4, classes: int = 4,
                 bn: bool = False) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small fixed MLP and inputs labelled with its own predictions (a few flipped to be skipped)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(features, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, classes)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(batch, features, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::5] = (y[::5] + 1) % classes  # every fifth sample is "misclassified" and must be skipped
    target = torch.randint(0, classes, (batch,), generator=generator)
    return model, x, y, target


def same(a: AttackResult, b: AttackResult) -> bool:
    return (torch.equal(a.delta, b.delta) and torch.equal(a.outcome, b.outcome)
            and torch.equal(a.rejected_steps, b.rejected_steps) and torch.equal(a.steps_active, b.steps_active)
            and a.steps_run == b.steps_run)


attack_settings = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "batch": st.integers(1, 12),
    "eps": st.sampled_from([0.05, 0.5, 2.0]),
    "steps": st.integers(0, 6),
    "step_size": st.sampled_from([0.05, 0.5, 3.0]),
    "norm": st.sampled_from(["linf", "l2"]),
    "sign": st.booleans(),
    "clamp": st.sampled_from([None, (-1.0, 1.0)]),
    "on_reject": st.sampled_from(["stay", "stop"]),
})


def run(function, params: dict) -> tuple[AttackResult, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    model, x, y, target = make_problem(params["seed"], batch=params["batch"])
    if params["clamp"] is not None:
        x = x.clamp(*params["clamp"])
    keys = ("eps", "steps", "step_size", "norm", "sign", "clamp", "on_reject")
    result = function(model, x, y, target, **{k: params[k] for k in keys})
    return result, x, y, target, model


@FEW
@given(attack_settings)
def test_fused_and_reference_agree_exactly(params: dict) -> None:
    fused, *_ = run(targeted_attack, params)
    reference, *_ = run(reference_attack, params)
    assert same(fused, reference)
    assert fused.forward_passes <= reference.forward_passes


@FEW
@given(attack_settings)
def test_attack_never_leaves_the_ball(params: dict) -> None:
    result, x, *_ = run(targeted_attack, params)
    eps = params["eps"]
    if params["norm"] == "linf":
        assert float(result.delta.abs().max()) <= eps
    else:
        assert float(result.delta.flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)
    if params["clamp"] is not None:
        low, high = params["clamp"]
        assert float((x + result.delta).min()) >= low - 1e-5
        assert float((x + result.delta).max()) <= high + 1e-5


@FEW
@given(attack_settings)
def test_outcomes_are_consistent_with_predictions(params: dict) -> None:
    result, x, y, target, model = run(targeted_attack, params)
    with torch.no_grad():
        initial = model(x).argmax(dim=1)
        final = model(x + result.delta).argmax(dim=1)
    skipped = (initial != y) | (target == y)
    assert torch.equal(result.outcome == SKIPPED, skipped)
    assert torch.equal(result.delta[skipped], torch.zeros_like(result.delta[skipped]))
    attacked = ~skipped
    # Every kept iterate is on the path: rejected steps (a third class) never survive.
    assert bool(((final == y) | (final == target))[attacked].all())
    success = result.outcome == SUCCESS
    assert bool((final[success] == target[success]).all())
    exhausted = result.outcome == EXHAUSTED
    assert bool((result.steps_active[exhausted] == params["steps"]).all())
    assert bool((result.rejected_steps <= result.steps_active).all())


@FEW
@given(attack_settings)
def test_a_sample_that_succeeds_stops(params: dict) -> None:
    short, *_ = run(targeted_attack, params)
    longer, *_ = run(targeted_attack, {**params, "steps": params["steps"] + 3})
    success = short.outcome == SUCCESS
    assert torch.equal(short.delta[success], longer.delta[success])
    assert torch.equal(short.steps_active[success], longer.steps_active[success])
    assert bool((longer.outcome[success] == SUCCESS).all())


def line_model() -> nn.Module:
    """1-D input; argmax regions along x: class 0 below 1, class 2 on (1, 2), class 1 above 2."""
    model = nn.Linear(1, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [2.0], [1.0]]))
        model.bias.copy_(torch.tensor([0.0, -3.0, -1.0]))
    return model.eval()


@pytest.mark.parametrize("function", [targeted_attack, reference_attack])
def test_rejected_steps_are_undone(function) -> None:
    model = line_model()
    x = torch.tensor([[0.5], [0.5]])
    y = torch.tensor([0, 0])
    # From 0.5 the gradient of log p_1 is ~1.5: step 0.5 lands in class 2's region, step 2.0 jumps to class 1.
    small = function(model, x, y, 1, eps=5.0, steps=4, step_size=0.5)
    assert small.outcome.tolist() == [EXHAUSTED, EXHAUSTED]
    assert small.rejected_steps.tolist() == [4, 4]
    assert torch.equal(small.delta, torch.zeros_like(x))
    stop = function(model, x, y, 1, eps=5.0, steps=4, step_size=0.5, on_reject="stop")
    assert stop.outcome.tolist() == [REJECTED, REJECTED]
    assert stop.steps_active.tolist() == [1, 1]
    assert torch.equal(stop.delta, torch.zeros_like(x))
    big = function(model, x, y, 1, eps=5.0, steps=4, step_size=2.0)
    assert big.outcome.tolist() == [SUCCESS, SUCCESS]
    assert big.steps_active.tolist() == [1, 1]
    assert bool((model(x + big.delta).argmax(dim=1) == 1).all())


def test_per_sample_targets_and_conv_model_agree() -> None:
    from models.networks import create_model

    torch.manual_seed(3)
    model = create_model("tiny_cnn", 5, in_channels=1).eval()
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    fused = targeted_attack(model, x, top2[:, 0], top2[:, 1], eps=1.0, steps=5, step_size=2.0)
    reference = reference_attack(model, x, top2[:, 0], top2[:, 1], eps=1.0, steps=5, step_size=2.0)
    assert same(fused, reference)
    assert fused.num_attacked == 6
    assert fused.forward_passes <= fused.steps_run + 1 < reference.forward_passes


def test_mode_restored_and_no_parameter_grads() -> None:
    model, x, y, target = make_problem(0, batch=8, bn=True)
    model.train()
    model[1].eval()  # a frozen BatchNorm must stay frozen, the rest in train mode
    before = [m.training for m in model.modules()]
    targeted_attack(model, x, y, target, eps=0.5, steps=3, step_size=0.5)
    reference_attack(model, x, y, target, eps=0.5, steps=3, step_size=0.5)
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_restores_after_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training and model[1].training


def test_projection() -> None:
    delta = torch.tensor([[3.0, -4.0], [0.3, 0.4]])
    assert torch.equal(project(delta, eps=1.0, norm="linf"), torch.tensor([[1.0, -1.0], [0.3, 0.4]]))
    l2 = project(delta, eps=1.0, norm="l2")
    assert torch.allclose(l2[0], torch.tensor([0.6, -0.8]))
    assert torch.equal(l2[1], delta[1])


def test_bad_arguments() -> None:
    model, x, y, target = make_problem(0, batch=2)
    with pytest.raises(ValueError):
        targeted_attack(model, x, y, target, eps=1.0, steps=2, step_size=0.1, norm="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        targeted_attack(model, x, y[:1], target, eps=1.0, steps=2, step_size=0.1)


def test_bench_attack_reports_speedup_and_identity(tmp_path) -> None:
    import argparse
    import json

    from models.commands import bench_attack

    parser = argparse.ArgumentParser()
    bench_attack.register(parser.add_subparsers().add_parser("bench").add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "attack", "--arch", "tiny_cnn", "--image-size", "8", "--batch", "4",
                              "--steps", "3", "--repeats", "1", "--step-size", "1.0", "--step-cost",
                              "--device", "cpu", "--json", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["identical"] is True and report["speedup"] > 0 and report["steps"] == 3
    assert report["step_cost"]["ratio"] > 0 and report["device"] == "cpu"
    assert {"torch_version", "fused_s", "reference_s", "batch"} <= set(report)
