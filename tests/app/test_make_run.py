"""`make run` = install + `rxverify up`: the whole first run as a real process, then a second run that reuses it."""

from __future__ import annotations

import re
import shlex
import stat
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.commands.up import KEY_VARIABLES, read_keys
from app.config import Settings
from app.db import Database
from app.orm import ApiKey, Dataset, ModelVersion, TrainingJob
from tests.app.up_process import free_port, pid_alive, start_up, up_env

ROOT = Path(__file__).resolve().parents[2]


def _curl_example(output: str) -> tuple[Path, str, str]:
    """The image path, NDC and key of the ready-to-paste curl line `up` printed."""
    line = next(line for line in output.splitlines() if line.strip().startswith("curl "))
    words = shlex.split(line)
    fields = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-F")
    key = words[words.index("-H") + 1].removeprefix("X-API-Key: ")
    return Path(fields["image"].removeprefix("@")), fields["prescribed_ndc"], key


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not found in:\n{text[-3000:]}"
    return int(match[1])


def _verify(url: str, *, image: Path, ndc: str, key: str) -> dict[str, object]:
    with image.open("rb") as handle:
        response = httpx.post(f"{url}/v1/verifications", headers={"X-API-Key": key}, timeout=30,
                              files={"image": (image.name, handle, "image/jpeg")}, data={"prescribed_ndc": ndc})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def _counts(settings: Settings) -> dict[str, int]:
    database = Database(settings)
    try:
        with database.session() as session:
            return {table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
                    for table in (ModelVersion, Dataset, ApiKey, TrainingJob)}
    finally:
        database.dispose()


@pytest.mark.slow
def test_up_builds_the_demo_once_serves_it_and_a_second_run_reuses_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    settings = Settings(data_dir=data_dir)
    env = up_env(data_dir, free_port())

    first = start_up(env, logs_dir=tmp_path, name="first")
    try:
        first.wait_ready(timeout_s=240)
        output = first.output()
        assert "first run: no model is registered yet" in output, first.logs()
        assert "dataset 'demo' registered" in output and "training the demo baseline" in output
        version = _number(r"model version (\d+) registered and active: test accuracy", output)
        # The key file: owner-only from the start, and the keys printed are the ones in it.
        key_file = data_dir / "keys" / "demo-keys.env"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        keys = read_keys(key_file)
        assert set(keys) == set(KEY_VARIABLES) and all(token in output for token in keys.values())
        image, ndc, key = _curl_example(output)
        assert key in keys.values() and image.is_file() and image.parent.parent.name == "test" and ndc == image.parent.name
        assert str(image).startswith(str(data_dir / "datasets" / "demo"))
        verdict = _verify(first.url, image=image, ndc=ndc, key=key)
        assert verdict["model_version"] == version and verdict["verdict"] in ("match", "mismatch", "review")
        database = Database(settings)
        with database.session() as session:
            model = session.get_one(ModelVersion, version)
            assert model.status == "promoted" and model.arch == "tiny_cnn" and model.image_size == 16
            assert model.metrics["evaluation"]["dataset"] == "demo" and model.decision  # a fitted verdict policy
            assert verdict["model_sha256"] == model.sha256
        database.dispose()
        worker_pid = _number(r"started the local training worker \(pid (\d+)\)", first.stderr.read_text())
        assert pid_alive(worker_pid)
    finally:
        code = first.interrupt()
    assert code == 0, first.logs()
    assert "Application shutdown complete" in first.stderr.read_text()
    deadline = time.monotonic() + 10
    while pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(worker_pid), "the local worker outlived the server"
    assert not (data_dir / "first-run").exists()  # the build's scratch space is gone
    before = _counts(settings)
    assert before == {"model_versions": 1, "datasets": 1, "api_keys": 3, "training_jobs": 0}

    second = start_up(env, logs_dir=tmp_path, name="second")
    try:
        ready_s = second.wait_ready(timeout_s=120)
        output = second.output()
        assert f"model version {version} (tiny_cnn, baseline) is active; reusing it" in output, second.logs()
        assert "first run" not in output and "training" not in output and "rendering" not in second.stderr.read_text()
        assert f"API keys read from {key_file}" in output and all(token in output for token in keys.values())
        assert read_keys(key_file) == keys and _curl_example(output) == (image, ndc, key)
        assert _verify(second.url, image=image, ndc=ndc, key=key)["model_version"] == version
    finally:
        code = second.interrupt()
    assert code == 0, second.logs()
    assert _counts(settings) == {**before, "api_keys": 3}
    assert ready_s < 60, f"the second start took {ready_s:.1f} s to be ready"
