"""Runtime helpers: device selection, seeding, mixed precision and CPU threads."""

from __future__ import annotations

import contextlib
import copy
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


def prepare_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """An inference-only copy of `model`: BatchNorm folded into convolutions, channels-last weights.

    Each BatchNorm that directly follows a convolution (the convolution's only user, each module called
    once) is folded into that convolution's weight and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`)
    and replaced by an identity, which saves a pass over every activation; 4-D weights are stored
    channels-last, the layout oneDNN's CPU kernels and cuDNN's tensor-core kernels prefer (feed it
    `channels_last_input`). The pairs are found on a torch.fx trace of the copy, but the copy stays a
    plain module (an fx GraphModule holds reference cycles, and a served model must be freed by
    reference counting when it is swapped out). Outputs equal the original's up to float rounding.
    Only for inference: the folded copy has no BatchNorm left to train. `model` itself is not changed;
    a model that torch.fx cannot trace (data-dependent control flow) is copied unfolded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    prepared = copy.deepcopy(model).eval()
    try:
        pairs = _conv_bn_pairs(prepared)
    except Exception as error:  # any tracing failure: serve the model unfolded
        logger.warning("BatchNorm folding skipped (%s is not traceable: %s)", type(model).__name__, error)
        pairs = []
    for conv_name, bn_name in pairs:
        conv, bn = prepared.get_submodule(conv_name), prepared.get_submodule(bn_name)
        assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
        _replace_submodule(prepared, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace_submodule(prepared, bn_name, torch.nn.Identity())
    return prepared.to(memory_format=torch.channels_last)


def _conv_bn_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) submodule names where the BatchNorm2d reads only that Conv2d's output, both called once."""
    tracer = torch.fx.Tracer()
    try:
        calls = [node for node in tracer.trace(model).nodes if node.op == "call_module"]
    finally:
        # The tracer ends up in a reference cycle (a closure holds it) and it holds `model`: drop its
        # references now, so the model is freed by reference counting, without waiting for a gc run.
        tracer.__dict__.clear()
    counts: dict[str, int] = {}
    for node in calls:
        counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    pairs = []
    for node in calls:
        bn = model.get_submodule(str(node.target))
        if not (isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if (isinstance(model.get_submodule(str(source.target)), torch.nn.Conv2d)
                and counts[str(source.target)] == 1 and counts[str(node.target)] == 1):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _replace_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def channels_last_input(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of images (N, C, H, W) in channels-last memory; other shapes unchanged."""
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
