"""Serving on a GPU: the folded, channels-last model gives the CPU's probabilities (float32 or bf16).

Runs only where CUDA is present (CI has none; run on a lent H100, see the README's "GPU checks").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.inference.images import ImageLimits
from app.inference.served import forward_probabilities, load_served_model
from tests.app.inference.conftest import CLASSES_B, jpeg_bytes, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_served_probabilities_on_cuda_match_the_cpu(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", classes=CLASSES_B, image_size=32, seed=4, temperature=0.5)
    on_cpu = load_served_model(checkpoint, version="cpu", device=torch.device("cpu"))
    on_gpu = load_served_model(checkpoint, version="gpu", device=torch.device("cuda"))
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    limits = ImageLimits()
    tensors = [on_cpu.preprocess(jpeg_bytes(seed=seed), limits=limits) for seed in range(16)]
    expected = forward_probabilities(on_cpu, tensors)
    fp32 = forward_probabilities(on_gpu, tensors)  # as served by default
    reduced = forward_probabilities(on_gpu, tensors, autocast=True)  # RXVERIFY_INFERENCE_AMP: bf16 autocast
    assert expected.shape == fp32.shape == reduced.shape == (16, len(CLASSES_B))
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    np.testing.assert_allclose(reduced, expected, atol=2e-2)
    np.testing.assert_allclose(reduced.sum(axis=1), 1.0, atol=1e-6)
