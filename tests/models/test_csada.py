"""CSADA: pair sampling follows c~, the stochastic weight is unbiased, and both algorithms train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from models.costs import CostMatrix
from models.csada import AdversarialDraw, CsadaConfig, CsadaMethod, PairSampler, dataset_labels
from models.methods import create_method

CLASSES = ("a", "b", "c")


def cost_matrix() -> CostMatrix:
    return CostMatrix.from_pairs(CLASSES, {("a", "b"): 5.0, ("c", "a"): 2.0, ("b", "c"): 0.0})


def toy_data(seed: int = 0, per_class: tuple[int, ...] = (6, 10, 4)) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    xs, ys = [], []
    for label, count in enumerate(per_class):
        xs.append(centres[label] + 0.8 * torch.randn(count, 2, generator=generator))
        ys.append(torch.full((count,), label))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def mlp(seed: int = 0, data: TensorDataset | None = None) -> nn.Module:
    """A small MLP, fitted to `data` for a few full-batch steps when given (so attacks have work to do)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    if data is not None:
        x, y = data.tensors
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def test_pair_frequencies_match_c_tilde() -> None:
    tempered = cost_matrix().tempered(2.0)
    labels = np.array([0] * 6 + [1] * 10 + [2] * 4)
    sampler = PairSampler(tempered=tempered, labels=labels)
    rng = np.random.default_rng(0)
    draws = 20_000
    counts = np.zeros_like(tempered)
    for _ in range(draws):
        a, b, _, indices = sampler.draw(rng, size=3)
        counts[a, b] += 1
        assert (labels[indices] == a).all()  # every step's draw comes from the pair's source class
    assert np.abs(counts / draws - tempered).max() < 0.01
    assert counts[1, 2] == 0 and np.trace(counts) == 0  # zero-cost pairs and the diagonal never come up


def test_weight_is_the_source_share_and_unbiased() -> None:
    tempered = cost_matrix().tempered(3.0)
    labels = np.array([0] * 6 + [1] * 10 + [2] * 4)
    sampler = PairSampler(tempered=tempered, labels=labels)
    share = np.array([6, 10, 4]) / 20
    positive = tempered > 0
    assert np.allclose(sampler.weights[positive], np.broadcast_to(share[:, None], (3, 3))[positive])
    # With a class absent from the training set, q renormalises and w compensates: E_q[w m] = sum c~ pi m.
    labels_missing = np.array([0] * 6 + [1] * 10)
    missing = PairSampler(tempered=tempered, labels=labels_missing)
    m = np.random.default_rng(1).random((3, 3))
    pi = np.array([6, 10, 0]) / 16
    assert np.isclose((missing.probabilities * missing.weights * m).sum(), (tempered * pi[:, None] * m).sum())


def test_stochastic_estimator_is_unbiased_for_the_full_objective() -> None:
    """Sum over pairs of q(a,b) * (stochastic loss with the whole class a drawn) == the full Algorithm 2 loss."""
    data = toy_data()
    x, y = data.tensors
    matrix = cost_matrix()
    hyper = {"lam": 3.0, "eps": 0.7, "steps": 4, "step_size": 0.5, "tau": 1.0}
    model = mlp(data=data)
    full = create_method("csada", cost_matrix=matrix, stochastic=False, **hyper)
    stochastic = create_method("csada", cost_matrix=matrix, stochastic=True, **hyper)
    stochastic.setup(train_dataset=data)
    assert isinstance(stochastic, CsadaMethod) and stochastic.sampler is not None
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(x), y)
    full_adversarial = float(full.compute_loss(model, x, y).loss.detach() - clean)
    expected = 0.0
    for (a, b), q in np.ndenumerate(stochastic.sampler.probabilities):
        if q == 0:
            continue
        members = y == a
        draw = (a, b, float(stochastic.sampler.weights[a, b]), np.flatnonzero(members.numpy()))
        extra = AdversarialDraw.from_pairs([draw], x[members], y[members])
        expected += q * float(stochastic.compute_loss(model, x, y, extra=extra).loss.detach() - clean)
    assert full_adversarial > 0
    assert expected == pytest.approx(full_adversarial, rel=1e-4)


def test_epoch_stream_is_deterministic_and_always_has_an_attack() -> None:
    data = toy_data()
    method = create_method("csada", cost_matrix=cost_matrix(), attack_batch_size=5)
    method.setup(train_dataset=data)
    loader = DataLoader(data, batch_size=4)
    first = list(method.epoch_stream(epoch=2, seed=7, steps=6, batch_size=4, loader=loader) or [])
    again = list(method.epoch_stream(epoch=2, seed=7, steps=6, batch_size=4, loader=loader) or [])
    other = list(method.epoch_stream(epoch=3, seed=7, steps=6, batch_size=4, loader=loader) or [])
    assert len(first) == 6
    for draw, repeat in zip(first, again, strict=True):
        ((a, b),) = draw.pairs
        assert draw.pairs == repeat.pairs and torch.equal(draw.x, repeat.x)
        assert draw.x.shape[0] == 5 and bool((draw.y == a).all()) and bool((draw.target == b).all()) and a != b
        assert bool((draw.weight > 0).all())
    assert any(not torch.equal(f.x, o.x) for f, o in zip(first, other, strict=True))


def test_several_pairs_per_step_keep_the_estimate_unbiased() -> None:
    data = toy_data()
    method = create_method("csada", cost_matrix=cost_matrix(), pairs_per_step=3, tau=1.0)
    method.setup(train_dataset=data)
    assert isinstance(method, CsadaMethod) and method.sampler is not None
    (draw,) = list(method.epoch_stream(epoch=0, seed=1, steps=1, batch_size=9, loader=DataLoader(data)) or [])
    assert len(draw.pairs) == 3 and draw.x.shape[0] == 9  # M = ceil(9 / 3) rows per pair
    for p, (a, b) in enumerate(draw.pairs):
        rows = slice(3 * p, 3 * p + 3)
        assert bool((draw.y[rows] == a).all()) and bool((draw.target[rows] == b).all())
        # Each pair's rows sum to w(a, b) / P: the mean over pairs of w * (row mean).
        assert float(draw.weight[rows].sum()) == pytest.approx(method.sampler.weights[a, b] / 3)


@pytest.mark.parametrize("stochastic", [True, False])
def test_loss_reports_attack_success(stochastic: bool) -> None:
    data = toy_data()
    method = create_method("csada", cost_matrix=cost_matrix(), stochastic=stochastic, eps=3.0, steps=5,
                           step_size=2.0, tau=1.0)
    method.setup(train_dataset=data)
    x, y = data.tensors
    model = mlp(data=data)
    extra = None
    if stochastic:
        extra = next(iter(method.epoch_stream(epoch=0, seed=0, steps=1, batch_size=8,
                                              loader=DataLoader(data, batch_size=8)) or []))
    output = method.compute_loss(model, x, y, extra=extra)
    output.loss.backward()
    assert output.attack is not None and output.attack.attacked > 0
    assert 0.0 <= output.attack.success_rate <= 1.0 and output.attack.steps_run >= 1
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("stochastic", [True, False])
def test_a_csada_step_runs_in_float32_under_the_engines_autocast(stochastic: bool) -> None:
    """bf16 autocast (here the CPU's, standing in for a GPU's) would round the paper's 1e-4 ascent steps
    away; by default a CSADA step ignores it and computes exactly what it computes without autocast."""
    data = toy_data()
    x, y = data.tensors

    def step(precision: str, *, autocast: bool) -> tuple[torch.Tensor, set[torch.dtype], torch.Tensor]:
        method = create_method("csada", cost_matrix=cost_matrix(), stochastic=stochastic, eps=1.0, steps=5,
                               step_size=1e-4, tau=1.0, attack_precision=precision)
        method.setup(train_dataset=data)
        model, dtypes = mlp(data=data), set()
        model.get_submodule("2").register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        extra = None
        if stochastic:
            extra = next(iter(method.epoch_stream(epoch=0, seed=0, steps=1, batch_size=8,
                                                  loader=DataLoader(data, batch_size=8)) or []))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = method.compute_loss(model, x, y, extra=extra)
        output.loss.backward()
        grad = model.get_submodule("0").get_parameter("weight").grad
        assert grad is not None
        return output.loss.detach(), dtypes, grad.clone()

    plain_loss, plain_dtypes, plain_grad = step("float32", autocast=False)
    loss, dtypes, grad = step("float32", autocast=True)
    assert plain_dtypes == dtypes == {torch.float32}
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)
    _, autocast_dtypes, _ = step("autocast", autocast=True)  # opted in: the caller's autocast applies
    assert torch.bfloat16 in autocast_dtypes


def test_config_validation_and_round_trip() -> None:
    config = CsadaConfig.from_dict({"lam": 10, "eps": 10, "steps": 10, "step_size": 0.05, "clamp": [0, 1]})
    assert config.clamp == (0.0, 1.0)
    assert CsadaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        CsadaConfig.from_dict({"lambda": 1})
    with pytest.raises(ValueError):
        CsadaConfig(norm="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attack_precision"):
        CsadaConfig(attack_precision="fp16")  # type: ignore[arg-type]


def test_per_channel_clamp_keeps_attacked_images_valid() -> None:
    """Normalised images have a different valid range per channel (`pixel_range`); a scalar range cannot say
    it, and the per-channel one once crashed CsadaConfig."""
    from models.transforms import pixel_range

    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.2)
    low, high = pixel_range(mean, std)
    assert low == pytest.approx((-2.0, -5 / 3, -3.5)) and high == pytest.approx((8.0, 5 / 3, 1.5))
    config = CsadaConfig(lam=1, eps=50.0, steps=5, step_size=5.0, sign=True, clamp=(list(low), list(high)))
    assert config.clamp == (low, high)
    assert CsadaConfig.from_dict(config.to_dict()) == config  # JSON-ready and back (checkpoint metadata)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    pixels = torch.rand(16, 3, 6, 6)
    x = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    y = model(x).argmax(1)  # every sample starts on its true class, so every one is attacked
    method = CsadaMethod(cost_matrix=cost_matrix(), config=config)
    result = method._attack(model, x, y, (y + 1) % 3)
    attacked = x + result.delta
    assert result.delta.abs().amax() > 1.0  # large steps: without the clamp the pixels would leave [0, 1]
    back = attacked * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    for bad in ([0], [1, 0], [[0, 0], [1]], [[0, 1], [1, 0]], [[], []], [0, [1]]):
        with pytest.raises(ValueError, match="clamp"):
            CsadaConfig(clamp=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 channels"):
        config.clamp_for(torch.zeros(2, 4, 6, 6))


def test_dataset_labels_through_wrappers() -> None:
    data = toy_data()
    subset = Subset(data, [0, 7, 19])
    assert dataset_labels(subset).tolist() == [0, 1, 2]
