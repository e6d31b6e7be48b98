"""Runtime helpers: the inference copy the service serves (BatchNorm folded, channels-last), deterministic kernels."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn

from models.networks import ARCHITECTURES, create_model
from models.runtime import channels_last_input, deterministic_kernels, prepare_for_inference


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (a fresh model's are 0/1, which would hide a bad fold)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_inference_copy_folds_every_batchnorm_and_gives_the_same_outputs(arch: str) -> None:
    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "mlp" else (3, 48, 48)
    model = _with_running_statistics(create_model(arch, 5, in_channels=shape[0],
                                                  input_shape=shape if arch == "mlp" else None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, *shape)
    prepared = prepare_for_inference(model, x[:1])
    with torch.inference_mode():
        expected, got = model(x), prepared(channels_last_input(x))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert not prepared.training and type(prepared) is type(model)  # a plain module, not an fx GraphModule
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in prepared.parameters() if p.dim() == 4)
    # The original is untouched (it is what gets saved and trained).
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The same fold in NCHW (RXVERIFY_INFERENCE_CHANNELS_LAST=false): same outputs, weights left contiguous.
    nchw = prepare_for_inference(model, x[:1], channels_last=False)
    with torch.inference_mode():
        assert torch.allclose(nchw(x), expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nchw.modules())
    assert all(p.is_contiguous() for p in nchw.parameters())


def test_the_inference_copy_is_freed_by_reference_counting() -> None:
    """A swapped-out model must go without a gc run (the serving process never calls gc.collect)."""
    prepared = prepare_for_inference(_with_running_statistics(create_model("resnet18", 4)), torch.zeros(1, 3, 32, 32))
    gc.disable()
    try:
        ref, weight = weakref.ref(prepared), weakref.ref(next(prepared.parameters()))
        del prepared
        assert ref() is None and weight() is None
    finally:
        gc.enable()


def test_preparing_leaves_forwards_in_other_threads_alone() -> None:
    """A hot swap prepares the new model while the old one serves: nothing process-wide may change."""
    import threading

    serving = _with_running_statistics(create_model("resnet18", 4))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = serving(x)
    failures: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    assert torch.equal(serving(x), expected)
            except BaseException as error:  # reported below
                failures.append(error)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(5):
            prepare_for_inference(create_model("resnet18", 4), torch.zeros(1, 3, 32, 32))
    finally:
        stop.set()
        thread.join()
    assert failures == []


def test_a_batchnorm_whose_convolution_output_is_reused_is_kept() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # folding bn into conv would change the second use of y

    model = _with_running_statistics(Residual())
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_for_inference(model, x[:1])
    assert isinstance(prepared.bn, nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.allclose(prepared(channels_last_input(x)), model(x), atol=1e-6)


def test_deterministic_kernels_are_restored_after_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    with pytest.raises(RuntimeError, match="inside"), deterministic_kernels():
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        raise RuntimeError("inside")
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_kernels_keep_a_callers_strict_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True)
    try:
        with deterministic_kernels():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
