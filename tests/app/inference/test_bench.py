"""The raw-pipeline benchmark helper runs end to end on a tiny model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from app.inference.bench import (
    EngineFigures,
    main,
    measure_engine,
    measure_pipeline,
    pmi_like_jpegs,
    served_random_model,
)
from app.inference.engine import EngineConfig, InferenceEngine
from app.inference.images import decode_image
from app.inference.metrics import InferenceMetrics


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


def test_measure_engine_drives_concurrent_clients(checkpoints: dict[str, Path], uploads: list[bytes]) -> None:
    async def scenario() -> EngineFigures:
        engine = InferenceEngine(config=EngineConfig(device="cpu", max_batch_size=4),
                                 metrics=InferenceMetrics(registry=CollectorRegistry()))
        await engine.load_model(checkpoints["a"], version="a")
        try:
            return await measure_engine(engine, images=uploads, concurrency=4, requests=12)
        finally:
            await engine.stop()

    figures = asyncio.run(scenario())
    assert figures.requests == 12 and figures.throughput_ips > 0 and figures.p99_ms >= figures.p50_ms > 0
    assert 1.0 <= figures.mean_batch_size <= 4.0


def test_command_line_prints_pipeline_and_engine_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--arch", "tiny_cnn", "--classes", "3", "--image-size", "32", "--batch", "2", "--repeats", "1",
                 "--photos", "1", "--device", "cpu", "--engine", "1", "2", "--engine-requests", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["arch"] == "tiny_cnn"
    assert [row["concurrency"] for row in report["engine"]] == [1, 2]
