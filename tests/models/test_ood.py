"""The unfamiliar-photo check (models.ood): conformal thresholds, fitted densities, feature taps."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from models.networks import create_model, feature_stages
from models.ood import (
    Familiarity,
    FeatureTaps,
    collect_features,
    conformal_threshold,
    fit_familiarity,
)
from models.runtime import channels_last_input, prepare_for_inference


def test_the_conformal_threshold_is_the_right_order_statistic() -> None:
    scores = np.arange(1.0, 100.0)  # 99 scores: 1 .. 99
    assert conformal_threshold(scores, 0.01) == 99.0  # ceil(100 * 0.99) = 99th smallest
    assert conformal_threshold(scores, 0.1) == 90.0  # ceil(100 * 0.9) = 90th
    assert conformal_threshold(scores[:98], 0.01) == math.inf  # 98 photos cannot support 1%: flag nothing
    with pytest.raises(ValueError):
        conformal_threshold(scores, 0.0)


def _gaussian_features(rng: np.random.Generator, n: int, *, centres: np.ndarray, shift: float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(centres), size=n)
    mixing = np.diag(np.linspace(0.5, 2.0, centres.shape[1]))  # correlated-looking, unequal spreads
    return centres[labels] + rng.normal(size=(n, centres.shape[1])) @ mixing + shift, labels


def _fitted(rng: np.random.Generator, centres: np.ndarray) -> Familiarity:
    train = _gaussian_features(rng, 900, centres=centres)
    valid, _ = _gaussian_features(rng, 600, centres=centres)
    deep = {"deep": train[0]}
    shallow = {"shallow": train[0][:, :4]}
    return fit_familiarity(({**shallow, **deep}, train[1]), {"shallow": valid[:, :4], "deep": valid},
                           num_classes=len(centres), weights_sha256="a" * 64)


def test_false_alarms_stay_near_the_rate_and_far_photos_are_flagged() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 8))
    familiarity = _fitted(rng, centres)
    ordinary, _ = _gaussian_features(rng, 5000, centres=centres)
    far, _ = _gaussian_features(rng, 500, centres=centres, shift=12.0)
    rate = 0.05
    flagged = familiarity.unfamiliarity(familiarity.scores({"shallow": ordinary[:, :4], "deep": ordinary}), rate) > 1
    # At most `rate` in expectation over the validation draw; with 600 validation photos a draw can
    # land a little above it, never far.
    assert 0.01 < flagged.mean() < rate + 0.025
    unfamiliar = familiarity.unfamiliarity(familiarity.scores({"shallow": far[:, :4], "deep": far}), rate)
    assert (unfamiliar > 1).all()
    # A stricter rate flags fewer ordinary photos; the union bound splits it over the two stages.
    strict = familiarity.unfamiliarity(familiarity.scores({"shallow": ordinary[:, :4], "deep": ordinary}), 0.005) > 1
    assert strict.mean() < flagged.mean()
    assert np.allclose(familiarity.thresholds(rate), [conformal_threshold(s.valid_scores, rate / 2)
                                                      for s in familiarity.stages.values()])


def test_a_familiarity_survives_its_file_and_a_damaged_file_is_refused() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(3, 8))
    familiarity = _fitted(rng, centres)
    again = Familiarity.from_bytes(familiarity.to_bytes())
    probe, _ = _gaussian_features(rng, 20, centres=centres)
    features = {"shallow": probe[:, :4], "deep": probe}
    assert np.array_equal(again.scores(features), familiarity.scores(features))
    assert again.weights_sha256 == "a" * 64 and again.report == familiarity.report
    data = familiarity.to_bytes()
    for damaged in (b"", b"garbage!", data[:100], data[:-8]):
        with pytest.raises(ValueError):
            Familiarity.from_bytes(damaged)
    with pytest.raises(ValueError, match="shape"):
        familiarity.scores({"shallow": probe[:, :3], "deep": probe})


def test_fitting_needs_every_class_and_finite_features() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(40, 5))
    labels = np.zeros(40, dtype=np.int64)
    with pytest.raises(ValueError, match="no training photo"):
        fit_familiarity(({"s": features}, labels), {"s": features}, num_classes=2, weights_sha256="b" * 64)
    labels[::2] = 1
    features[0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        fit_familiarity(({"s": features}, labels), {"s": features}, num_classes=2, weights_sha256="b" * 64)


@pytest.mark.parametrize(("arch", "expected"), [
    ("tiny_cnn", {"features.0": 16, "features.1": 32, "features.2": 64}),
    ("resnet9", {"prep": 64, "layer1": 128, "layer2": 256, "layer3": 512}),
    ("resnet18", {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}),
    ("mlp", {"body.2": 256, "body.4": 256}),
])
def test_every_architecture_names_its_feature_stages(arch: str, expected: dict[str, int]) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 5, input_shape=(3, 32, 32))
    assert feature_stages(model) == tuple(expected)
    loader = [(torch.rand(6, 3, 32, 32), torch.arange(6) % 5)]
    features, labels = collect_features(model, loader, device="cpu")
    assert {name: array.shape for name, array in features.items()} == {name: (6, d) for name, d in expected.items()}
    assert labels.tolist() == [0, 1, 2, 3, 4, 0]
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # taps removed


def test_taps_read_the_served_copy_like_the_trained_model_and_keep_threads_apart() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 4).eval()
    inputs = torch.rand(3, 3, 64, 64)
    trained, _ = collect_features(model, [(inputs, torch.zeros(3))], device="cpu")
    served = prepare_for_inference(model, inputs[:1])  # BatchNorm folded, channels-last
    taps = FeatureTaps(served, feature_stages(model))
    with torch.inference_mode():
        served(channels_last_input(inputs))  # outside `capture`: nothing is recorded anywhere
        with taps.capture() as found:
            served(channels_last_input(inputs))
    for name, array in trained.items():
        assert np.allclose(found[name].numpy(), array, atol=1e-4, rtol=1e-3)

    results: dict[int, tuple[int, ...]] = {}
    barrier = threading.Barrier(2)

    def run(size: int) -> None:
        with torch.inference_mode(), taps.capture() as mine:
            barrier.wait()
            for _ in range(3):
                served(channels_last_input(torch.rand(size, 3, 64, 64)))
        results[size] = tuple(mine["layer4"].shape)

    threads = [threading.Thread(target=run, args=(size,)) for size in (2, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {2: (2, 512), 5: (5, 512)}
