"""Embedded mode end to end: `rxverify serve` on SQLite with the SQLAlchemy broker starts and supervises
its own worker; a training job succeeds through it; a killed worker is restarted; Ctrl-C stops both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.orm import Role
from tests.worker.factories import ROOT, seeded_sqlite_settings, tiny_assets, wait_for, worker_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc, Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_supervises_a_local_worker_that_runs_a_job(tmp_path: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    settings, seeded = seeded_sqlite_settings(root, tiny_assets(root / "tiny-assets"), tmp_path / "data",
                                              training_lease_s=4, torch_threads=1, model_poll_seconds=0.5)
    assert settings.broker_url.startswith("sqla+sqlite") and settings.is_sqlite
    port, log = _free_port(), tmp_path / "serve.log"
    env = worker_env(settings, RXVERIFY_MODEL_POLL_SECONDS="0.5")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    pharmacist = {"X-API-Key": seeded.keys[Role.PHARMACIST]}
    admin = {"X-API-Key": seeded.keys[Role.ADMIN]}  # an auto-promoting job needs the admin role
    try:
        def ready() -> bool:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=90, interval=0.3, what="the server")
        [worker] = wait_for(lambda: _children(server.pid), timeout=10, what="the local worker")
        wait_for(lambda: " ready." in log.read_text(errors="replace"), timeout=90, interval=0.3, what="worker")

        created = httpx.post(f"{base}/v1/admin/training-jobs", headers=admin, timeout=10,
                             json={"dataset": "tiny", "method": "csada", "auto_promote": True,
                                   "hyperparameters": {"epochs": 2, "batch_size": 8, "steps": 3}})
        assert created.status_code == 202, created.text

        def finished() -> dict[str, Any] | None:
            job = httpx.get(f"{base}{created.headers['location']}", headers=pharmacist, timeout=10).json()
            assert job["status"] not in ("failed", "cancelled"), job
            return job if job["status"] == "succeeded" else None

        job = wait_for(finished, timeout=120, interval=0.3, what="the job")
        result = job["result"]
        assert isinstance(result, dict) and result["model_version_id"] == 3  # after models A (1) and B (2)
        model = httpx.get(f"{base}/v1/admin/models/3", headers=pharmacist, timeout=10).json()
        assert model["lineage"]["training_job"] == job["id"] and model["metrics"]["valid"]["n"] == 12

        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: [p for p in _children(server.pid) if p != worker], timeout=20, what="a restarted worker")
        assert "exited with status -9; restarting" in log.read_text()

        server.send_signal(signal.SIGINT)  # Ctrl-C
        server.wait(timeout=60)
        time.sleep(0.2)
        assert not [pid for pid in _children(os.getpid()) if pid == server.pid]
        restarted = [line for line in log.read_text().splitlines() if "started the local training worker" in line]
        assert len(restarted) == 2
        last_pid = int(restarted[-1].rsplit("pid ", 1)[1].rstrip(")"))
        wait_for(lambda: not _alive(last_pid), timeout=30, what="the worker to stop with the server")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
