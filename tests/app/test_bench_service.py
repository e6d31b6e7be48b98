"""`rxverify bench service`: its pieces (fast) and one small end-to-end run with real servers (slow)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import main as cli_main
from app.commands import bench_support as support
from app.orm import Role
from tests.app.model_factory import FAVOURITE, cached_checkpoint, jpeg_photo, make_checkpoint, served_settings
from tests.conftest import ApiEnv


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-checkpoints")


def test_the_pre_encoded_body_is_what_the_service_reads(seeded_sqlite_template: Any, tmp_path: Path,
                                                        make_client: Any, checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root))
    env = ApiEnv(settings, make_client(settings), dict(keys))
    body, content_type = support.multipart_body(jpeg_photo(), prescribed_ndc=FAVOURITE)
    response = env.client.post("/v1/verifications", content=body,
                               headers={**env.as_role(Role.CLIENT), "Content-Type": content_type})
    assert response.status_code == 200 and response.json()["prescribed_ndc"] == FAVOURITE


def test_load_result_summary() -> None:
    result = support.LoadResult(concurrency=4, requests=5, wall_s=2.0, latencies_s=[0.1, 0.2, 0.3, 0.4],
                                statuses={200: 4, 503: 1})
    summary = result.summary()
    assert summary["throughput_rps"] == 2.0 and summary["ok"] == 4 and summary["statuses"] == {"200": 4, "503": 1}
    assert summary["p50_ms"] == 250.0 and 395 < summary["p99_ms"] <= 400


def test_photos_have_the_pmi_size(tmp_path: Path) -> None:
    from PIL import Image

    (photo,) = support.render_photos(tmp_path, count=1)
    with Image.open(io.BytesIO(photo)) as image:
        assert image.size == (1284, 960) and image.format == "JPEG"
    assert support.render_photos(tmp_path, count=1) == [photo]  # rendered once, then read back


def test_the_untrained_default_model_takes_an_architecture_and_size(tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint
    from models.pmi import PMI_NDCS

    path = support.build_untrained_checkpoint(tmp_path / "tiny", arch="tiny_cnn", image_size=48, seed=3)
    loaded = load_checkpoint(path)
    assert loaded.metadata.arch == "tiny_cnn" and loaded.metadata.image_size == 48
    assert loaded.metadata.classes == PMI_NDCS and loaded.metadata.decision  # a fitted verdict policy
    assert support.build_untrained_checkpoint(path, arch="tiny_cnn", image_size=48, seed=3) == path  # reused


@pytest.mark.slow
@pytest.mark.parametrize("levels", ["1,2", "2"])
def test_a_small_end_to_end_run(tmp_path: Path, levels: str) -> None:
    # One level alone ("2") once ran the naive server twice at it and failed on the per-round ratios.
    from models.pmi import PMI_NDCS

    top = f"c{levels.split(',')[-1]}"

    checkpoint = make_checkpoint(tmp_path / "tiny", classes=PMI_NDCS, image_size=32)
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "service", "--model", str(checkpoint), "--requests", "4", "--rounds", "1",
                     "--concurrency", levels, "--photos", "1", "--stage-repeats", "1", "--batch-wait-ms", "1",
                     "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for ratio in ("throughput_ratio", "p50_ratio", "vs_naive"):
        assert result[ratio] > 0
    assert result["service"][top]["statuses"] == {"200": 4} and result["naive"][top]["statuses"] == {"200": 4}
    assert result["per_round_ratios"]["vs_naive"] == [result["vs_naive"]]
    assert result["device"].split(":")[0] in ("cpu", "cuda") and result["model"]["untrained"] is False
    assert result["raw"]["throughput_rps"] > 0 and result["machine"]["cpu_count"]
    # The configuration it ran: the CPU rule for inference workers (cores // torch threads), the eager forward.
    threads, cores = result["torch_threads"], result["machine"]["cpu_count"]
    expected_workers = 1 if result["device"].startswith("cuda") else max(1, cores // threads)
    assert result["engine"]["inference_workers"] == expected_workers
    stages = result["raw"]["stages_ms"]
    assert all(stages[f"forward_{n}_{form}_ms"] > 0 for n in ("1", "batch") for form in ("other_layout", "eager"))
    # The served layout, as auto chooses it for the device (channels-last on a CPU).
    assert result["engine"]["channels_last"] is result["raw"]["channels_last"] is (result["device"] == "cpu")


def test_inference_workers_default_follows_the_cores() -> None:
    import os

    from app.commands.bench_service import default_inference_workers

    assert default_inference_workers("cpu", 1) == max(1, os.cpu_count() or 1)
    assert default_inference_workers("cpu", 10_000) == 1
