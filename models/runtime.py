"""Runtime helpers: device selection, seeding, mixed precision and CPU threads."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Resolve "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N" to a torch.device."""
    choice = preference.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 where the GPU supports it, else fp16; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast_context(device: torch.device, *, enabled: bool = True) -> Iterator[None]:
    """torch.autocast on CUDA (bf16 if supported, else fp16); a no-op on CPU or when disabled."""
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def create_grad_scaler(device: torch.device, *, enabled: bool = True) -> Any | None:
    """A GradScaler only when autocast runs in fp16 (bf16 has fp32's range and needs none)."""
    if not enabled or amp_dtype(device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def set_cpu_threads(n: int | None) -> None:
    """Limit torch's intra-op CPU threads; None leaves torch's default alone."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1 (got {n})")
    torch.set_num_threads(n)
    logger.debug("torch intra-op threads set to %d", n)
