"""Runtime helpers: device selection, seeding, mixed precision and CPU threads."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
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


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic cuDNN/cuBLAS kernels inside the block (for bit-for-bit comparisons), then as before.

    With the defaults, cuDNN may pick a different algorithm for the same convolution from one call to
    the next (autotuning, or kernels that sum in a varying order), so two runs of the same computation
    can differ in the last bits on a GPU: `rxverify bench attack` on an H100 reported "identical false"
    for the fused and reference attacks until they ran under this. The CPU kernels are deterministic
    already. Ops with no deterministic kernel only warn (unless the caller had strict mode on already).
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it first starts in a process: it is set for the block (and
    restored after) when unset, which helps only if nothing used cuBLAS before; set it in the environment
    to be sure.
    """
    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if saved_env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=not saved[2] or saved[3])
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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


def prepare_for_inference(model: torch.nn.Module, example: torch.Tensor, *, channels_last: bool = True
                          ) -> torch.nn.Module:
    """An inference-only copy of `model`: BatchNorm folded into convolutions, channels-last weights.

    Each BatchNorm2d that reads a Conv2d's output, where that output has no other use and each module is
    called once, is folded into the convolution's weight and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`)
    and replaced by an identity; this saves a pass over every activation. With `channels_last` (the
    default), 4-D weights are stored channels-last, the layout oneDNN's CPU kernels prefer (feed it
    `channels_last_input`); see `serve_channels_last` for where it is used. Outputs equal the original's
    up to float rounding. Only for inference: the copy has no BatchNorm left to train; `model` itself is
    not changed.

    The pairs are found by running `example` (one input batch) through the copy with forward hooks on
    its own modules and reading the autograd graph, not with torch.fx: fx's tracer patches
    `nn.Module.__call__` for the whole process while it runs, which breaks forwards that other threads
    (the serving engine during a hot swap) run at the same time.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    prepared = copy.deepcopy(model).eval()
    for conv_name, bn_name in _conv_bn_pairs(prepared, example):
        conv, bn = prepared.get_submodule(conv_name), prepared.get_submodule(bn_name)
        assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
        _replace_submodule(prepared, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace_submodule(prepared, bn_name, torch.nn.Identity())
    return prepared.to(memory_format=torch.channels_last) if channels_last else prepared


def _conv_bn_pairs(model: torch.nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, bn) names where the eval-mode BatchNorm2d is the only reader of the Conv2d's output."""
    calls: dict[str, int] = {}
    conv_outputs: dict[str, torch.Tensor] = {}
    bn_inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str, store: dict[str, torch.Tensor], use_input: bool) -> Any:
        def hook(_module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            value = inputs[0] if use_input and len(inputs) == 1 else output
            if isinstance(value, torch.Tensor):
                store[name] = value
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(recorder(name, conv_outputs, use_input=False)))
        elif isinstance(module, torch.nn.BatchNorm2d) and module.running_mean is not None:
            handles.append(module.register_forward_hook(recorder(name, bn_inputs, use_input=True)))
    try:
        with torch.enable_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    # How many autograd nodes read each node's result: a convolution whose output feeds anything
    # besides its BatchNorm (a residual `bn(y) + y`, say) must keep its own output.
    readers: dict[Any, int] = {}
    seen: set[Any] = set()
    stack = [output.grad_fn] if isinstance(output, torch.Tensor) else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for upstream, _ in node.next_functions:
            if upstream is not None:
                readers[upstream] = readers.get(upstream, 0) + 1
                stack.append(upstream)
    producer = {id(output): name for name, output in conv_outputs.items()}  # the tensors are alive: ids unique
    pairs = []
    for bn_name, bn_input in bn_inputs.items():
        conv_name = producer.get(id(bn_input))
        if (conv_name is not None and calls[conv_name] == 1 and calls[bn_name] == 1
                and readers.get(bn_input.grad_fn, 0) == 1):
            pairs.append((conv_name, bn_name))
    return pairs


def _replace_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def serve_channels_last(device: torch.device, *, autocast: bool, preference: str = "auto") -> bool:
    """Whether a served model runs channels-last on `device`: `preference` "true" or "false", or the default.

    The default is channels-last on the CPU (measured on the 2-core development machine by `rxverify bench
    service`, ResNet-18 at 224 px, one torch thread: a batch of 16 in 609.85 ms channels-last, 751.55 ms
    folded NCHW, 959.08 ms as loaded; README, "GPU checks"), and on CUDA only under autocast, where
    cuDNN's tensor-core kernels want NHWC (not measured here). In
    float32 on an H100 the channels-last served copy was slower than the model as loaded (README, "GPU
    checks"); that comparison also timed host work the other did not do, so it is not conclusive, and
    `rxverify bench service --device cuda` now times the three forms alike: set
    RXVERIFY_INFERENCE_CHANNELS_LAST to the faster one.
    """
    if preference not in ("auto", "true", "false"):
        raise ValueError(f"channels-last preference must be auto, true or false (got {preference!r})")
    if preference != "auto":
        return preference == "true"
    return device.type != "cuda" or autocast


def channels_last_input(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of images (N, C, H, W) in channels-last memory; other shapes unchanged."""
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
