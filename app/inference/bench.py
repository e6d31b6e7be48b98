"""Raw pipeline figures without HTTP: decode (JPEG draft) + EvalPreset + forward, single image and batched.

`rxverify bench service` reuses `measure_pipeline` for its "raw pipeline limit" and single-image latency.
Run by hand: `python -m app.inference.bench --arch resnet18 --batch 16 [--engine 1 4 16]` (JSON on stdout).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.inference.images import ImageLimits, decode_image
from app.inference.served import ServedModel, forward_probabilities, load_served_model
from models.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from models.networks import create_model
from models.pmi import PMI_PRODUCTS
from models.runtime import prepare_for_inference, select_device, serve_channels_last, set_cpu_threads
from models.transforms import EvalPreset

PMI_PHOTO_SIZE = (1284, 960)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PipelineFigures:
    """Medians (ms) of each stage and the batched throughput (images/s) on one device."""

    device: str
    arch: str
    image_size: int
    batch_size: int
    torch_threads: int
    repeats: int
    decode_ms: float  # one photo, JPEG draft sized for the preset
    full_decode_ms: float  # one photo decoded at full resolution (what a naive server does)
    preprocess_ms: float  # EvalPreset on the drafted photo
    forward_1_ms: float  # forward + softmax at batch 1
    single_image_ms: float  # decode + preprocess + forward at batch 1, end to end
    forward_batch_ms: float  # forward + softmax at batch_size
    batch_pipeline_ms: float  # decode + preprocess of batch_size photos + one forward
    throughput_ips: float  # batch_size / batch_pipeline: the raw pipeline limit
    channels_last: bool = True  # the served layout (RXVERIFY_INFERENCE_CHANNELS_LAST)
    # When the model as loaded was given, the same forwards (same stacking, transfer and softmax as
    # forward_1_ms) with other forms of it: BatchNorm folded as served but in the other memory layout, and
    # the model as loaded (no folding, NCHW), which the naive server of `bench service` runs.
    forward_1_other_layout_ms: float | None = None
    forward_batch_other_layout_ms: float | None = None
    forward_1_eager_ms: float | None = None
    forward_batch_eager_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def pmi_like_jpegs(*, count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """Synthetic pill-bottle photos at the PMI size (1284x960), JPEG-encoded like real uploads."""
    from models.synth import render_bottle

    rng = np.random.default_rng(seed)
    photos = []
    for index in range(count):
        product = PMI_PRODUCTS[index % len(PMI_PRODUCTS)]
        image = render_bottle(product, rng=rng, image_size=PMI_PHOTO_SIZE[1]).resize(PMI_PHOTO_SIZE)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        photos.append(out.getvalue())
    return photos


def served_random_model(*, arch: str, num_classes: int, image_size: int, device: torch.device,
                        model: torch.nn.Module | None = None, channels_last: bool = True) -> ServedModel:
    """A randomly initialised model (or `model`, as created) wrapped as a bundle, prepared as the service
    prepares a loaded checkpoint (timing only: no checkpoint or weights needed)."""
    metadata = CheckpointMetadata(classes=tuple(f"class-{i}" for i in range(num_classes)), arch=arch, in_channels=3,
                                  image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model = model if model is not None else create_model(arch, num_classes).to(device).eval()
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    return ServedModel(model=prepare_for_inference(model, example, channels_last=channels_last), metadata=metadata,
                       preset=EvalPreset.from_metadata(metadata), version=f"random-{arch}", device=device,
                       weights_sha256="0" * 64, policy=None, channels_last=channels_last)


def _median_ms(action: Callable[[], object], *, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(samples)


def measure_pipeline(served: ServedModel, *, images: Sequence[bytes], batch_size: int = 16, repeats: int = 10,
                     warmup: int = 2, limits: ImageLimits | None = None,
                     eager: torch.nn.Module | None = None) -> PipelineFigures:
    """Time each stage in this process (no HTTP, no queue) on `images` (cycled) with `served`.

    `eager`: the served model as loaded, before `prepare_for_inference`; its forwards, and those of the
    folded model in the layout not served, are timed through the same `forward_probabilities` path.
    """
    limits = limits or ImageLimits()
    preset = served.preset
    cursor = iter(range(1 << 62))

    def photo() -> bytes:
        return images[next(cursor) % len(images)]

    def decode(data: bytes, *, draft: bool = True) -> Image.Image:
        return decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                            allowed_formats=limits.allowed_formats,
                            draft_size=preset.draft_request if draft else None, min_side=limits.min_side)

    drafted = decode(images[0])
    one, batch = [preset(drafted)], [preset(drafted)] * batch_size

    def batch_pipeline() -> None:
        forward_probabilities(served, [preset(decode(photo())) for _ in range(batch_size)])

    figures = {
        "decode_ms": _median_ms(lambda: decode(photo()), repeats=repeats * 3, warmup=warmup),
        "full_decode_ms": _median_ms(lambda: decode(photo(), draft=False), repeats=repeats * 3, warmup=warmup),
        "preprocess_ms": _median_ms(lambda: preset(drafted), repeats=repeats * 3, warmup=warmup),
        "forward_1_ms": _median_ms(lambda: forward_probabilities(served, one), repeats=repeats * 3, warmup=warmup),
        "single_image_ms": _median_ms(lambda: forward_probabilities(served, [preset(decode(photo()))]),
                                      repeats=repeats * 3, warmup=warmup),
        "forward_batch_ms": _median_ms(lambda: forward_probabilities(served, batch), repeats=repeats, warmup=warmup),
        "batch_pipeline_ms": _median_ms(batch_pipeline, repeats=repeats, warmup=1),
    }
    if eager is not None:
        example = torch.zeros(1, *served.input_shape, device=served.device)
        forms = {"other_layout": replace(served, channels_last=not served.channels_last, model=prepare_for_inference(
                     eager, example, channels_last=not served.channels_last)),
                 "eager": replace(served, model=eager.eval(), channels_last=False)}
        for name, form in forms.items():
            figures[f"forward_1_{name}_ms"] = _median_ms(partial(forward_probabilities, form, one),
                                                         repeats=repeats * 3, warmup=warmup)
            figures[f"forward_batch_{name}_ms"] = _median_ms(partial(forward_probabilities, form, batch),
                                                             repeats=repeats, warmup=warmup)
    return PipelineFigures(device=str(served.device), arch=served.metadata.arch, image_size=preset.image_size,
                           batch_size=batch_size, torch_threads=torch.get_num_threads(), repeats=repeats,
                           throughput_ips=1000.0 * batch_size / figures["batch_pipeline_ms"],
                           channels_last=served.channels_last, **figures)


@dataclass(frozen=True)
class EngineFigures:
    """Closed-loop load on an InferenceEngine in this process (no HTTP): throughput and latency percentiles."""

    concurrency: int
    requests: int
    throughput_ips: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


async def measure_engine(engine: Any, *, images: Sequence[bytes], concurrency: int, requests: int,
                         limits: ImageLimits | None = None) -> EngineFigures:
    """Drive `engine.predict_image` with `concurrency` clients, each sending its next photo when answered."""
    import asyncio

    limits = limits or ImageLimits()
    latencies: list[float] = []
    batches_before = engine.metrics.batch_size.collect()[0].samples
    counter = iter(range(requests))

    async def client() -> None:
        for index in counter:
            start = time.perf_counter()
            await engine.predict_image(images[index % len(images)], limits=limits)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    after = engine.metrics.batch_size.collect()[0].samples

    def total(samples: Any, suffix: str) -> float:
        return sum(s.value for s in samples if s.name.endswith(suffix))

    forwards = total(after, "_count") - total(batches_before, "_count")
    ordered = sorted(latencies)
    return EngineFigures(concurrency=concurrency, requests=len(latencies), throughput_ips=len(latencies) / elapsed,
                         p50_ms=1000 * ordered[len(ordered) // 2],
                         p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                         mean_batch_size=len(latencies) / forwards if forwards else 0.0)


async def _engine_figures(checkpoint: Path, *, images: Sequence[bytes], device: str, threads: int | None,
                          batch: int, max_wait_ms: float, concurrencies: Sequence[int], requests: int,
                          channels_last: str = "auto") -> list[dict[str, Any]]:
    from prometheus_client import CollectorRegistry

    from app.inference.engine import EngineConfig, InferenceEngine
    from app.inference.metrics import InferenceMetrics

    engine = InferenceEngine(config=EngineConfig(device=device, torch_threads=threads, max_batch_size=batch,
                                                 max_wait_ms=max_wait_ms, channels_last=channels_last),
                             metrics=InferenceMetrics(registry=CollectorRegistry()))
    await engine.load_model(checkpoint, version=checkpoint.name)
    try:
        await measure_engine(engine, images=images, concurrency=2, requests=4)  # warm the thread pools
        return [(await measure_engine(engine, images=images, concurrency=c, requests=max(requests, 2 * c))).to_dict()
                for c in concurrencies]
    finally:
        await engine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the figures as JSON."""
    import asyncio
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: a random model)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engine", type=int, nargs="*", metavar="CONCURRENCY",
                        help="also drive the InferenceEngine in process at these concurrencies (e.g. 1 4 16)")
    parser.add_argument("--engine-requests", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                        help="the served layout, as RXVERIFY_INFERENCE_CHANNELS_LAST")
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    device = select_device(args.device)
    layout = serve_channels_last(device, autocast=False, preference=args.channels_last)
    images = pmi_like_jpegs(count=args.photos)
    with tempfile.TemporaryDirectory(prefix="rxverify-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint:
            served = load_served_model(checkpoint, version=checkpoint.name, device=device, channels_last=layout)
            eager = load_checkpoint(checkpoint, device=device).model.eval()
        else:
            eager = create_model(args.arch, args.classes).to(device).eval()
            served = served_random_model(arch=args.arch, num_classes=args.classes, image_size=args.image_size,
                                         device=device, model=eager, channels_last=layout)
            if args.engine:
                checkpoint = Path(scratch) / f"random-{args.arch}"
                save_checkpoint(checkpoint, model=eager, metadata=served.metadata)
        report: dict[str, Any] = {"pipeline": measure_pipeline(served, images=images, batch_size=args.batch,
                                                               repeats=args.repeats, eager=eager).to_dict()}
        del served, eager
        if args.engine and checkpoint is not None:
            report["engine"] = asyncio.run(_engine_figures(
                checkpoint, images=images, device=args.device, threads=args.threads, batch=args.batch,
                max_wait_ms=args.max_wait_ms, concurrencies=args.engine, requests=args.engine_requests,
                channels_last=args.channels_last))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
