"""Inference engine on real tiny checkpoints: batching, max wait, back-pressure, swaps, failures, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from app.inference.engine import EngineConfig, InferenceEngine, InferenceFailed, ModelUnavailable, QueueFull
from app.inference.images import ImageLimits, decode_image
from app.inference.metrics import InferenceMetrics
from app.inference.served import ModelLoadError, Prediction, ProductNotServed
from models.checkpoint import load_checkpoint
from models.costs import CostMatrix
from models.decision import VerdictPolicy
from models.transforms import EvalPreset
from tests.app.inference.conftest import CLASSES_A, CLASSES_B, make_checkpoint

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 22)
T = TypeVar("T")


def run(scenario: Callable[[InferenceEngine, CollectorRegistry], Awaitable[T]], **config: Any) -> T:
    """Run a scenario against a fresh engine (own metrics registry) and always stop it."""
    async def main() -> T:
        registry = CollectorRegistry()
        engine = InferenceEngine(config=EngineConfig(device="cpu", torch_threads=1, **config),
                                 metrics=InferenceMetrics(registry=registry))
        await engine.start()
        try:
            return await scenario(engine, registry)
        finally:
            await engine.stop()

    return asyncio.run(main())


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


def test_no_model_means_model_unavailable(uploads: list[bytes]) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> None:
        assert not engine.ready
        with pytest.raises(ModelUnavailable) as caught:
            await engine.predict_image(uploads[0], limits=LIMITS)
        assert (caught.value.status, caught.value.slug) == (503, "model-unavailable")

    run(scenario)
    stopped = InferenceEngine(config=EngineConfig(device="cpu"), metrics=InferenceMetrics(registry=CollectorRegistry()))
    with pytest.raises(ModelUnavailable):
        stopped.current  # noqa: B018


@pytest.mark.parametrize("layout", ["auto", "true", "false"])
def test_predictions_are_the_calibrated_softmax_of_the_checkpoint(checkpoints: dict[str, Path],
                                                                  uploads: list[bytes], layout: str) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> Prediction:
        await engine.load_model(checkpoints["a"], version="a")
        assert engine.ready and sample(registry, "rxverify_model_ready") == 1
        return await engine.predict_image(uploads[0], limits=LIMITS)

    prediction = run(scenario, channels_last=layout)
    # RXVERIFY_INFERENCE_CHANNELS_LAST: "auto" is channels-last on a CPU; the weights are in the layout served.
    channels_last = layout != "false"
    assert prediction.served.channels_last is channels_last
    convs = [p for p in prediction.served.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) is channels_last for p in convs)
    loaded = load_checkpoint(checkpoints["a"])
    preset = EvalPreset.from_metadata(loaded.metadata)
    image = decode_image(uploads[0], max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels,
                         draft_size=preset.draft_request)
    with torch.no_grad():
        expected = torch.softmax(loaded.model(preset(image)[None]) / 1.5, dim=1)[0].numpy()
    assert prediction.model_version == "a" and prediction.classes == CLASSES_A
    np.testing.assert_allclose(prediction.probs, expected, rtol=1e-4, atol=1e-6)
    assert prediction.served.policy is None


def test_concurrent_requests_are_batched(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry
                       ) -> tuple[list[Prediction], CollectorRegistry]:
        await engine.load_model(checkpoints["a"], version="a")
        predictions = await asyncio.gather(*(engine.predict_image(uploads[i % 8], limits=LIMITS) for i in range(24)))
        return predictions, registry

    predictions, registry = run(scenario, max_batch_size=8, max_wait_ms=50)
    assert len(predictions) == 24 and all(abs(p.probs.sum() - 1) < 1e-5 for p in predictions)
    batches = sample(registry, "rxverify_inference_batch_size_count")
    assert sample(registry, "rxverify_inference_batch_size_sum") == 24
    assert batches < 24 and 24 / batches > 1  # mean batch size above one
    assert sample(registry, "rxverify_inference_batch_size_bucket", le="8.0") == batches  # never above max
    assert sample(registry, "rxverify_inference_queue_wait_seconds_count") == 24


def test_a_lone_request_waits_at_most_max_wait(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> tuple[float, float]:
        await engine.load_model(checkpoints["a"], version="a")
        tensor = engine.current.preprocess(uploads[0], limits=LIMITS)
        start = time.perf_counter()
        await engine.submit(tensor, served=engine.current)
        lone = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(engine.submit(tensor, served=engine.current) for _ in range(4)))
        full = time.perf_counter() - start
        return lone, full

    lone, full = run(scenario, max_batch_size=4, max_wait_ms=400, adaptive_wait=False)
    assert 0.38 <= lone < 0.38 + 2.0  # waited for partners, but no longer than max_wait (+ one forward)
    assert full < 0.35  # a full batch starts at once


def test_adaptive_wait_runs_a_lone_request_at_once(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> float:
        await engine.load_model(checkpoints["a"], version="a")
        start = time.perf_counter()
        await engine.predict_image(uploads[0], limits=LIMITS)
        return time.perf_counter() - start

    assert run(scenario, max_batch_size=4, max_wait_ms=1000) < 0.9  # nobody else is coming: no wait


def test_a_full_queue_refuses_at_once_with_retry_after(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> None:
        await engine.load_model(checkpoints["a"], version="a")
        served = engine.current
        tensor = served.preprocess(uploads[0], limits=LIMITS)
        gate = threading.Event()
        assert engine._executor is not None
        engine._executor.submit(gate.wait)  # stall the torch thread: nothing leaves the queue
        try:
            in_flight = []
            for _ in range(3):  # the first request goes into the stalled batch, two fill the queue
                in_flight.append(asyncio.create_task(engine.submit(tensor, served=served)))
                await asyncio.sleep(0.05)
            assert engine.queue_depth == 2
            start = time.perf_counter()
            with pytest.raises(QueueFull) as caught:
                await engine.submit(tensor, served=served)
            assert time.perf_counter() - start < 0.05
            assert caught.value.status == 503 and int(caught.value.headers["Retry-After"]) >= 1
            assert sample(registry, "rxverify_inference_rejected_total", reason="queue-full") == 1
        finally:
            gate.set()
        assert len(await asyncio.gather(*in_flight)) == 3

    run(scenario, max_batch_size=1, max_wait_ms=0, queue_size=2)


def test_swaps_under_load_never_mix_versions_and_fail_nothing(checkpoints: dict[str, Path],
                                                              uploads: list[bytes]) -> None:
    classes = {"a": CLASSES_A, "b": CLASSES_B}
    Outcome = tuple[str, tuple[str, ...], tuple[str, ...], tuple[int, ...]] | BaseException

    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> list[Outcome]:
        await engine.load_model(checkpoints["a"], version="a")
        first = weakref.ref(engine.current.model)
        done = asyncio.Event()
        results: list[Outcome] = []

        async def client(index: int) -> None:
            while not done.is_set():
                try:
                    p = await engine.predict_image(uploads[index], limits=LIMITS)
                    # Keep plain values only: a kept Prediction would keep its model alive.
                    results.append((p.model_version, p.classes, p.served.classes, p.probs.shape))
                except Exception as error:  # counted as a failure below
                    results.append(error)

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        for version in ("b", "a", "b", "a", "b"):
            await asyncio.sleep(0.05)
            await engine.swap_to(checkpoints[version], version=version)
        await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*clients)
        assert first() is None  # the first model was freed once its in-flight batches finished
        assert sample(registry, "rxverify_model_swaps_total", outcome="success") == 6
        assert registry.get_sample_value("rxverify_model_info", {"version": "b", "weights_sha256":
                                         engine.current.weights_sha256, "arch": "tiny_cnn", "device": "cpu",
                                         "channels_last": "true"}) == 1
        return results

    results = run(scenario, max_batch_size=4, max_wait_ms=2)
    assert not [r for r in results if isinstance(r, BaseException)]
    served_versions = set()
    for outcome in results:
        assert not isinstance(outcome, BaseException)
        version, names, served_names, shape = outcome
        # Inputs are 16 px for "a" and 24 px for "b": a mixed batch could not even be stacked.
        assert names == served_names == classes[version] and shape == (len(names),)
        served_versions.add(version)
    assert served_versions == {"a", "b"} and len(results) > 20


def test_a_failed_load_or_warm_up_keeps_the_old_model(checkpoints: dict[str, Path], uploads: list[bytes],
                                                      tmp_path: Path) -> None:
    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> None:
        await engine.load_model(checkpoints["a"], version="a")
        with pytest.raises(ModelLoadError, match="missing"):
            await engine.swap_to(tmp_path / "nowhere", version="ghost")
        with pytest.raises(ModelLoadError, match="non-finite"):
            await engine.swap_to(checkpoints["nan"], version="nan")
        assert sample(registry, "rxverify_model_swaps_total", outcome="failure") == 2
        assert sample(registry, "rxverify_model_swap_failed") == 1
        assert engine.ready and engine.current.version == "a"
        assert (await engine.predict_image(uploads[1], limits=LIMITS)).model_version == "a"
        await engine.swap_to(checkpoints["b"], version="b")
        assert sample(registry, "rxverify_model_swap_failed") == 0

    run(scenario)


def test_the_stored_verdict_policy_travels_with_the_model(tmp_path: Path, uploads: list[bytes]) -> None:
    policy = VerdictPolicy.review_only(CLASSES_A, critical_cost=5.0)
    path = make_checkpoint(tmp_path / "p", classes=CLASSES_A, image_size=16, seed=4, decision=policy.to_dict())

    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> Prediction:
        await engine.load_model(path, version="p")
        return await engine.predict_image(uploads[2], limits=LIMITS)

    prediction = run(scenario)
    assert prediction.served.policy == policy
    decision, fitted = prediction.decide(prescribed=CLASSES_A[1], cost_matrix=CostMatrix.uniform(CLASSES_A[::-1]),
                                         critical_cost=5.0)
    assert (decision.verdict, decision.prescribed) == ("review", CLASSES_A[1])  # the review-only policy
    assert fitted is False  # a review-only policy was fitted for no cost matrix
    assert decision.probability_prescribed == pytest.approx(prediction.probs[1])
    with pytest.raises(ProductNotServed) as caught:
        prediction.decide(prescribed="99999-9999", cost_matrix=CostMatrix.uniform(CLASSES_A), critical_cost=5.0)
    assert (caught.value.status, caught.value.slug) == (422, "product-not-in-model")


def test_stop_resolves_every_request_and_refuses_new_ones(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def main() -> None:
        engine = InferenceEngine(config=EngineConfig(device="cpu", max_batch_size=2, max_wait_ms=1),
                                 metrics=InferenceMetrics(registry=CollectorRegistry()))
        await engine.load_model(checkpoints["a"], version="a")
        pending = [asyncio.create_task(engine.predict_image(uploads[i], limits=LIMITS)) for i in range(6)]
        await asyncio.sleep(0)
        await engine.stop()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(o, Prediction | ModelUnavailable) for o in outcomes)
        assert not engine.ready
        with pytest.raises(ModelUnavailable):
            await engine.predict_image(uploads[0], limits=LIMITS)

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_a_failing_forward_fails_its_batch_only(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom at /srv/secret/path.safetensors")

    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> None:
        good = await engine.load_model(checkpoints["a"], version="a")
        broken = dataclasses.replace(good, model=Broken(), version="broken")
        tensor = good.preprocess(uploads[0], limits=LIMITS)
        with pytest.raises(InferenceFailed, match=r"model broken failed to run \(RuntimeError\)") as caught:
            await engine.submit(tensor, served=broken)
        assert caught.value.status == 500 and "/srv" not in str(caught.value)  # internals stay in the log
        assert (await engine.submit(tensor, served=good)).model_version == "a"
        assert engine.ready

    run(scenario)


@pytest.mark.parametrize("workers", [1, 2])
def test_inference_workers_compute_that_many_batches_at_once(checkpoints: dict[str, Path], uploads: list[bytes],
                                                            workers: int) -> None:
    """Each forward holds its torch thread for a while: at most `inference_workers` run side by side, and all
    requests are answered by the right model."""
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def enter(_module: Any, _inputs: Any) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)

    def leave(_module: Any, _inputs: Any, _output: Any) -> None:
        with lock:
            state["now"] -= 1

    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> list[Prediction]:
        served = await engine.load_model(checkpoints["a"], version="a")
        served.model.register_forward_pre_hook(enter)
        served.model.register_forward_hook(leave)
        tensors = [served.preprocess(uploads[i % 8], limits=LIMITS) for i in range(6)]
        return list(await asyncio.gather(*(engine.submit(t, served=served) for t in tensors)))

    predictions = run(scenario, max_batch_size=1, max_wait_ms=0, inference_workers=workers)
    assert [p.model_version for p in predictions] == ["a"] * 6
    assert state["peak"] == workers
    with pytest.raises(ValueError, match="inference_workers"):
        EngineConfig(inference_workers=0)


def test_the_engine_serves_float32_unless_amp_is_set(tmp_path: Path) -> None:
    """The thresholds were fitted on float32 outputs: bf16 autocast is an operator's opt-in."""
    from app.config import Settings

    assert EngineConfig.from_settings(Settings(data_dir=tmp_path)).autocast is False
    assert EngineConfig.from_settings(Settings(data_dir=tmp_path, inference_amp=True)).autocast is True


def test_the_served_layout_follows_the_setting_and_the_device(tmp_path: Path) -> None:
    """RXVERIFY_INFERENCE_CHANNELS_LAST: auto is channels-last on a CPU, and on CUDA only under autocast."""
    from pydantic import ValidationError

    from app.config import Settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = EngineConfig.from_settings(Settings(data_dir=tmp_path))
    assert auto.channels_last_on(cpu) is True and auto.channels_last_on(cuda) is False
    amp = EngineConfig.from_settings(Settings(data_dir=tmp_path, inference_amp=True))
    assert amp.channels_last_on(cuda) is True
    for value, expected in (("true", True), ("false", False)):
        forced = EngineConfig.from_settings(Settings(data_dir=tmp_path, inference_channels_last=value))
        assert forced.channels_last_on(cpu) is expected and forced.channels_last_on(cuda) is expected
    with pytest.raises(ValidationError, match="inference_channels_last"):
        Settings(data_dir=tmp_path, inference_channels_last="yes")
    with pytest.raises(ValueError, match="auto, true or false"):
        EngineConfig(channels_last="yes").channels_last_on(cpu)


def test_a_swap_frees_the_old_model_without_a_full_garbage_collection(
        checkpoints: dict[str, Path], uploads: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """gc.collect() stalls every thread of a serving process: a swap relies on reference counting."""
    from app.inference import engine as engine_module

    collections: list[int] = []
    monkeypatch.setattr(engine_module.gc, "collect", lambda *args: collections.append(1) or 0)

    async def scenario(engine: InferenceEngine, registry: CollectorRegistry) -> None:
        await engine.load_model(checkpoints["a"], version="a")
        await engine.predict_image(uploads[0], limits=LIMITS)
        old = weakref.ref(engine.current.model)
        await engine.swap_to(checkpoints["b"], version="b")
        assert old() is None and collections == []
        # A model something still holds (here: this test) goes when the holder lets go.
        kept = engine.current.model
        held = weakref.ref(kept)
        await engine.swap_to(checkpoints["a"], version="a")
        assert held() is not None
        del kept
        assert held() is None and collections == []

    run(scenario)
