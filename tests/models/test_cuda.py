"""The CUDA paths of the engine: the batched attack, autocast training and checkpoints across devices.

These run only where a GPU is present (CI has none; they were run on a lent H100, see the README's
"GPU checks"). Everything else in the suite runs the same code on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from models.attacks import SKIPPED, reference_attack, targeted_attack
from models.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from models.costs import CostMatrix
from models.engine import TrainConfig, create_train_loader, fit
from models.methods import create_method
from models.networks import create_model
from models.runtime import amp_dtype, autocast_context, deterministic_kernels, select_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = ("00378-0208", "00591-0461", "50111-0434", "53489-0156")


def small_problem(seed: int = 0, n: int = 64, size: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN and images labelled with its own predictions (so the attack has samples to work on)."""
    torch.manual_seed(seed)
    model = create_model("small_cnn", len(CLASSES), input_shape=(3, size, size)).eval()
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fused_attack_equals_the_reference_on_cuda(norm: str) -> None:
    """The bench's claim on the GPU: bit for bit the same perturbations and outcomes (deterministic kernels)."""
    model, x, y = small_problem()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    target = (y + 1) % len(CLASSES)
    kwargs: dict[str, Any] = {"eps": 0.5, "steps": 10, "step_size": 0.05, "norm": norm}
    with deterministic_kernels():
        fused = targeted_attack(model, x, y, target, **kwargs)
        reference = reference_attack(model, x, y, target, **kwargs)
    assert fused.delta.device.type == "cuda"
    assert torch.equal(fused.outcome, reference.outcome)
    assert torch.equal(fused.steps_active, reference.steps_active)
    assert torch.equal(fused.delta, reference.delta)
    assert fused.forward_passes < reference.forward_passes


def test_attack_on_cuda_agrees_with_the_cpu() -> None:
    """The same attack on both devices: the same outcomes, perturbations equal up to float rounding."""
    model, x, y = small_problem(seed=1)
    target = (y + 2) % len(CLASSES)
    kwargs: dict[str, Any] = {"eps": 0.5, "steps": 5, "step_size": 0.05, "norm": "linf"}
    on_cpu = targeted_attack(model, x, y, target, **kwargs)
    on_gpu = targeted_attack(model.cuda(), x.cuda(), y.cuda(), target.cuda(), **kwargs)
    agree = (on_gpu.outcome.cpu() == on_cpu.outcome).float().mean().item()
    assert agree >= 0.95, agree  # a sample on a decision boundary may flip under other float rounding
    same = on_gpu.outcome.cpu() == on_cpu.outcome
    assert torch.allclose(on_gpu.delta.cpu()[same], on_cpu.delta[same], atol=1e-3, rtol=0)
    assert not (on_cpu.outcome == SKIPPED).all()


def test_autocast_uses_bf16_or_fp16_on_cuda() -> None:
    device = select_device("cuda")
    seen: list[torch.dtype] = []
    conv = nn.Conv2d(3, 4, 3).cuda()
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with autocast_context(device):
        conv(torch.randn(2, 3, 8, 8, device=device))
    assert seen == [amp_dtype(device)] and seen[0] in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("precision", ["float32", "autocast"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_csada_fine_tunes_under_autocast_on_cuda(stochastic: bool, precision: str) -> None:
    """CSADA (Algorithms 2 and 3) trains on the GPU with the engine's autocast on: finite losses, attacks
    that succeed; its steps run in float32 unless `attack_precision` lets autocast apply."""
    model, x, y = small_problem(seed=2, n=96)
    costs = CostMatrix.from_pairs(CLASSES, {(CLASSES[0], CLASSES[1]): 10.0, (CLASSES[2], CLASSES[3]): 5.0})
    method = create_method("csada", cost_matrix=costs, lam=2.0, eps=0.5, steps=5, step_size=0.05,
                           stochastic=stochastic, attack_precision=precision)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes: set[torch.dtype] = set()
    model.fc.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))  # type: ignore[union-attr]
    result = fit(model, train_loader=create_train_loader(TensorDataset(x, y), batch_size=32, seed=0),
                 method=method, config=TrainConfig(epochs=2, lr=1e-3, amp=True, freeze_bn=True), device="cuda")
    assert result.epochs_run == 2
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in result.history)
    assert all(record["attack_success_rate"] is not None for record in result.history)
    if precision == "autocast":
        assert amp_dtype(torch.device("cuda")) in dtypes
    else:
        assert dtypes == {torch.float32}
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters(), strict=True))
    assert next(model.parameters()).dtype == torch.float32  # autocast never changes the stored weights


def test_checkpoint_written_on_cuda_loads_on_the_cpu(tmp_path: Path) -> None:
    model, x, _ = small_problem(seed=3)
    model = model.cuda()
    metadata = CheckpointMetadata(classes=CLASSES, arch="small_cnn", in_channels=3, image_size=16,
                                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), method="baseline",
                                  hyperparameters={}, cost_matrix_sha256="ab" * 32, dataset_fingerprint="fp",
                                  parent_sha256=None, metrics={})
    save_checkpoint(tmp_path / "ckpt", model=model, metadata=metadata)
    on_cpu = load_checkpoint(tmp_path / "ckpt", device="cpu")
    on_gpu = load_checkpoint(tmp_path / "ckpt", device="cuda")
    with torch.no_grad():
        expected = model(x.cuda()).cpu()
        assert torch.equal(on_gpu.model(x.cuda()).cpu(), expected)
        assert torch.allclose(on_cpu.model(x), expected, atol=1e-4, rtol=1e-4)
