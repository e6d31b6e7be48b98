"""Fixture checkpoints for the verification tests, made with models/ code (seconds, cached per session).

A "rigged" tiny_cnn: its head's weights are zero and its bias holds log-probabilities, so every photo
gets the same, known calibrated probabilities (`favourite` at `confidence`, the rest shared evenly).
Its verdict policy is fitted by `models.decision.fit_policy` on simulated validation outputs under the
PMI expert costs, so the thresholds and conformal quantiles are real fitted values. The served classes
leave out one catalog product (`NOT_SERVED`), to test a product the model does not know.
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.db import Database
from app.services.audit import Actor
from app.services.model_registry import register_and_activate
from models.checkpoint import (
    CheckpointMetadata,
    encode_validation_outputs,
    save_checkpoint,
    with_updated_metadata,
)
from models.costs import CostMatrix
from models.decision import fit_policy
from models.networks import create_model
from models.pmi import PMI_EXPERT_COSTS, PMI_NDCS

NOT_SERVED = "69315-0905"
SERVED_CLASSES: tuple[str, ...] = tuple(ndc for ndc in PMI_NDCS if ndc != NOT_SERVED)
FAVOURITE = "00378-0208"  # what the rigged model sees in every photo
CRITICAL_COST = 5.0


def expert_costs(classes: Sequence[str]) -> CostMatrix:
    """The PMI expert cost matrix over `classes`."""
    known = set(classes)
    pairs = {pair: cost for pair, cost in PMI_EXPERT_COSTS.items() if pair[0] in known and pair[1] in known}
    return CostMatrix.from_pairs(tuple(classes), pairs)


def simulated_validation(classes: Sequence[str], *, per_class: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validation outputs of a decent model: each photo's true class gets 0.6 to 0.99, the rest is spread."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    labels = np.repeat(np.arange(k), per_class)
    probs = rng.dirichlet(np.ones(k), size=labels.size)
    peak = rng.uniform(0.6, 0.99, size=labels.size)
    probs = probs * (1 - peak)[:, None] / (1 - probs[np.arange(labels.size), labels])[:, None]
    probs[np.arange(labels.size), labels] = peak
    return probs / probs.sum(axis=1, keepdims=True), labels


def make_checkpoint(directory: Path, *, classes: Sequence[str] = SERVED_CLASSES, favourite: str = FAVOURITE,
                    confidence: float = 0.98, image_size: int = 32, fitted: bool = True, seed: int = 0,
                    arch: str = "tiny_cnn", store_validation: bool = True, familiar_photos: int = 0) -> Path:
    """Save a rigged checkpoint (see the module docstring); `fitted=False` stores no verdict policy.

    `store_validation=False` leaves out the validation outputs (a checkpoint from before they were stored).
    `familiar_photos` > 0 fits the unfamiliar-photo check (`models.ood`) on that many `jpeg_photo` noise
    photos per split (labels dealt round the classes): noise is then what this model knows.
    """
    classes = tuple(classes)
    torch.manual_seed(seed)
    model = create_model(arch, len(classes))
    head = model.fc if hasattr(model, "fc") else None
    if arch == "tiny_cnn" and isinstance(head, torch.nn.Linear):
        rest = math.log((1 - confidence) / (len(classes) - 1))
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(rest)
            head.bias[classes.index(favourite)] = math.log(confidence)
    decision: dict[str, Any] = {}
    validation: bytes | None = None
    if fitted:
        probs, labels = simulated_validation(classes, seed=seed)
        policy = fit_policy(probs, labels, cost_matrix=expert_costs(classes), critical_cost=CRITICAL_COST,
                            classes=classes, seed=seed)
        decision = policy.to_dict()
        if store_validation:  # what worker.registration stores, so that the API can refit the policy
            validation = encode_validation_outputs(probs, labels)
    metadata = CheckpointMetadata(classes=classes, arch=arch, in_channels=3, image_size=image_size,
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), method="baseline",
                                  decision=decision)
    sha256 = save_checkpoint(directory, model=model, metadata=metadata)
    familiarity = (fit_noise_familiarity(model, metadata, photos=familiar_photos, weights_sha256=sha256)
                   if familiar_photos else None)
    if validation is not None or familiarity is not None:
        with_updated_metadata(directory, directory, validation=validation, familiarity=familiarity)
    return directory


def fit_noise_familiarity(model: torch.nn.Module, metadata: CheckpointMetadata, *, photos: int,
                          weights_sha256: str) -> bytes:
    """The familiarity file of a model that has only ever seen `jpeg_photo` noise (see make_checkpoint)."""
    from app.inference.images import decode_image
    from models.ood import collect_features, fit_familiarity
    from models.transforms import EvalPreset

    preset = EvalPreset.from_metadata(metadata)

    def batches(first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = [preset(decode_image(jpeg_photo(seed=first + i), max_bytes=1 << 20, max_pixels=1 << 20,
                                       draft_size=preset.draft_request))  # decoded as the API decodes
                   for i in range(photos)]
        labels = torch.arange(photos) % metadata.num_classes
        return [(torch.stack(tensors), labels)]

    train = collect_features(model, batches(1000), device="cpu")
    valid, _labels = collect_features(model, batches(2000), device="cpu")
    return fit_familiarity(train, valid, num_classes=metadata.num_classes, weights_sha256=weights_sha256).to_bytes()


_cache: dict[tuple[Any, ...], Path] = {}


def cached_checkpoint(root: Path, **options: Any) -> Path:
    """make_checkpoint once per option set per session (`root` is a session-scoped temp dir)."""
    key = tuple(sorted(options.items()))
    path = _cache.get(key)
    if path is None or not path.is_dir():
        path = make_checkpoint(root / f"ckpt-{len(_cache)}", **options)
        _cache[key] = path
    return path


def install_model(settings: Settings, checkpoint: Path) -> int:
    """Register and activate a checkpoint in the settings' database (before the app starts); its version id."""
    database = Database(settings)
    try:
        with database.session() as session:
            return register_and_activate(session, source=checkpoint, settings=settings,
                                         actor=Actor.cli("test install_model")).id
    finally:
        database.dispose()


def jpeg_photo(*, size: tuple[int, int] = (96, 72), seed: int = 0, quality: int = 85) -> bytes:
    """A noisy JPEG (the rigged model ignores the pixels; the decoder does not)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def image_bytes(image_format: str, *, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small image in any Pillow format (PNG, WEBP, GIF, BMP ...): a gradient, since a solid one is blank."""
    ramp = np.linspace(40, 220, size[0], dtype=np.float64)
    pixels = np.broadcast_to(ramp[None, :, None], (size[1], size[0], 3)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format=image_format)
    return out.getvalue()


def blank_photo(colour: str = "white", *, size: tuple[int, int] = (200, 200), noise: float = 0.0) -> bytes:
    """A PNG with nothing in it (a white or black frame), with Gaussian sensor noise of `noise` grey levels."""
    rng = np.random.default_rng(0)
    level = {"white": 255.0, "black": 0.0}[colour]
    pixels = np.clip(level + rng.normal(0.0, noise, size=(size[1], size[0], 3)) if noise else
                     np.full((size[1], size[0], 3), level), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def served_settings(template: Path, data_dir: Path, *, checkpoint: Path | None, **overrides: Any) -> Settings:
    """Settings on a fresh copy of a seeded database, with `checkpoint` registered and active (if given)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, data_dir / "rxverify.db")
    settings = Settings(data_dir=data_dir, **overrides)
    if checkpoint is not None:
        install_model(settings, checkpoint)
    return settings


def post_verification(client: Any, key: str, *, image: bytes | None = None, ndc: str | None = FAVOURITE,
                      filename: str = "bottle.jpg", content_type: str = "image/jpeg",
                      headers: dict[str, str] | None = None, **fields: str) -> Any:
    """POST /v1/verifications as multipart (None leaves a part out)."""
    files = {"image": (filename, image, content_type)} if image is not None else None
    data = {name: value for name, value in {"prescribed_ndc": ndc, **fields}.items() if value is not None}
    return client.post("/v1/verifications", files=files, data=data, headers={"X-API-Key": key, **(headers or {})})


def multipart(parts: Sequence[tuple[str, str | None, bytes]], *, boundary: str = "rxv-test-boundary") -> tuple[bytes, str]:
    """A hand-built multipart/form-data body from (name, filename or None, data) parts, and its content type."""
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
