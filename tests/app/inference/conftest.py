"""Fixtures for the inference engine: tiny real checkpoints made with models.checkpoint, JPEG uploads."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from models.checkpoint import CheckpointMetadata, save_checkpoint
from models.networks import classifier_head, create_model

CLASSES_A = ("00000-0001", "00000-0002", "00000-0003")
CLASSES_B = ("00000-0001", "00000-0002", "00000-0003", "00000-0004", "00000-0005")


def make_checkpoint(path: Path, *, classes: Sequence[str], image_size: int, seed: int, temperature: float = 1.0,
                    decision: dict[str, Any] | None = None, poison: bool = False) -> Path:
    """Save a tiny_cnn checkpoint; `poison` fills the head with NaN so that its warm-up fails."""
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", len(classes))
    if poison:
        with torch.no_grad():
            classifier_head(model).weight.fill_(float("nan"))
    metadata = CheckpointMetadata(classes=tuple(classes), arch="tiny_cnn", in_channels=3, image_size=image_size,
                                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), temperature=temperature,
                                  decision=decision or {})
    save_checkpoint(path, model=model, metadata=metadata)
    return path


def jpeg_bytes(*, seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small noisy JPEG upload."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two servable models that differ in classes AND input size, and one whose warm-up fails."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "a": make_checkpoint(root / "a", classes=CLASSES_A, image_size=16, seed=1, temperature=1.5),
        "b": make_checkpoint(root / "b", classes=CLASSES_B, image_size=24, seed=2),
        "nan": make_checkpoint(root / "nan", classes=CLASSES_A, image_size=16, seed=3, poison=True),
    }


@pytest.fixture(scope="session")
def uploads() -> list[bytes]:
    """Eight distinct JPEG uploads."""
    return [jpeg_bytes(seed=i) for i in range(8)]
