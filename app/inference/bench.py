"""Raw pipeline figures without HTTP: decode (JPEG draft) + EvalPreset + forward, single image and batched.

`rxverify bench service` reuses `measure_pipeline` for its "raw pipeline limit" and single-image latency.
Run by hand: `python -m app.inference.bench --arch resnet18 --classes 20 --image-size 224 --batch 16`.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.inference.images import ImageLimits, decode_image
from app.inference.served import ServedModel, forward_probabilities, load_served_model
from models.checkpoint import CheckpointMetadata
from models.networks import create_model
from models.pmi import PMI_PRODUCTS
from models.runtime import select_device, set_cpu_threads
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


def served_random_model(*, arch: str, num_classes: int, image_size: int, device: torch.device) -> ServedModel:
    """A randomly initialised model wrapped as a bundle (timing only: no checkpoint or weights needed)."""
    metadata = CheckpointMetadata(classes=tuple(f"class-{i}" for i in range(num_classes)), arch=arch, in_channels=3,
                                  image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model = create_model(arch, num_classes).to(device).eval()
    return ServedModel(model=model, metadata=metadata, preset=EvalPreset.from_metadata(metadata),
                       version=f"random-{arch}", device=device, weights_sha256="0" * 64, policy=None)


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
                     warmup: int = 2, limits: ImageLimits | None = None) -> PipelineFigures:
    """Time each stage in this process (no HTTP, no queue) on `images` (cycled) with `served`."""
    limits = limits or ImageLimits()
    preset = served.preset
    cursor = iter(range(1 << 62))

    def photo() -> bytes:
        return images[next(cursor) % len(images)]

    def decode(data: bytes, *, draft: bool = True) -> Image.Image:
        return decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                            allowed_formats=limits.allowed_formats,
                            draft_size=preset.draft_request if draft else None)

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
    return PipelineFigures(device=str(served.device), arch=served.metadata.arch, image_size=preset.image_size,
                           batch_size=batch_size, torch_threads=torch.get_num_threads(), repeats=repeats,
                           throughput_ips=1000.0 * batch_size / figures["batch_pipeline_ms"], **figures)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the figures as JSON."""
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
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    device = select_device(args.device)
    if args.checkpoint:
        served = load_served_model(args.checkpoint, version=args.checkpoint.name, device=device)
    else:
        served = served_random_model(arch=args.arch, num_classes=args.classes, image_size=args.image_size,
                                     device=device)
    figures = measure_pipeline(served, images=pmi_like_jpegs(count=args.photos), batch_size=args.batch,
                               repeats=args.repeats)
    json.dump(figures.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
