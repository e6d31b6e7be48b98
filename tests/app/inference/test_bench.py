"""The raw-pipeline benchmark helper runs end to end on a tiny model."""

from __future__ import annotations

import torch

from app.inference.bench import measure_pipeline, pmi_like_jpegs, served_random_model
from app.inference.images import decode_image


def test_measure_pipeline_reports_every_stage(uploads: list[bytes]) -> None:
    served = served_random_model(arch="tiny_cnn", num_classes=4, image_size=32, device=torch.device("cpu"))
    figures = measure_pipeline(served, images=uploads, batch_size=4, repeats=2, warmup=1)
    body = figures.to_dict()
    assert body["device"] == "cpu" and body["batch_size"] == 4 and body["arch"] == "tiny_cnn"
    assert all(body[key] > 0 for key in ("decode_ms", "preprocess_ms", "forward_1_ms", "single_image_ms",
                                         "forward_batch_ms", "batch_pipeline_ms", "throughput_ips"))


def test_pmi_like_photos_have_the_pmi_size() -> None:
    (photo,) = pmi_like_jpegs(count=1, seed=3)
    image = decode_image(photo, max_bytes=1 << 24, max_pixels=1 << 24)
    assert image.size == (1284, 960)
