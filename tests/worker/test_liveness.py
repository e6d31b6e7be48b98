"""The worker's liveness file (the compose health check) and its end of a stuck process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from worker import liveness

ROOT = Path(__file__).resolve().parents[2]


def _check(path: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The compose health check's command, as the container runs it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RXVERIFY_")}
    if path is not None:
        env["RXVERIFY_WORKER_ALIVE_FILE"] = str(path)
    return subprocess.run([sys.executable, "-m", "worker.liveness", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_health_check_command_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "worker.alive"
    missing = _check(path)
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    alive = liveness.AliveFile(path, every_s=0.05)
    alive.start()
    try:
        before = path.stat().st_mtime_ns
        time.sleep(0.3)
        assert path.stat().st_mtime_ns > before  # the thread rewrites it
        assert _check(path).returncode == 0
    finally:
        alive.stop()
    assert not path.exists() and _check(path).returncode == 1
    path.write_text("old\n")
    os.utime(path, (time.time() - 120, time.time() - 120))
    stale = _check(path, "--max-age-s", "60")
    assert stale.returncode == 1 and re.search(r"last written 1[12]\d s ago \(limit 60 s\)", stale.stdout), stale.stdout
    assert _check(None).returncode == 2


def test_the_worker_keeps_the_file_only_when_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker import tasks

    class Conf:
        def __init__(self, path: Path | None) -> None:
            self.rxverify_settings = type("S", (), {"worker_alive_file": path})()

    class Sender:
        def __init__(self, path: Path | None) -> None:
            self.app = type("A", (), {"conf": Conf(path)})()

    monkeypatch.setattr(tasks, "_alive_file", None)
    tasks._start_alive_file(sender=Sender(None))
    assert tasks._alive_file is None
    path = tmp_path / "alive"
    tasks._start_alive_file(sender=Sender(path))
    try:
        assert path.exists() and liveness.check_alive(path, max_age_s=60)[0]
    finally:
        monkeypatch.setattr(tasks, "_reaper", None)
        tasks._stop_background_threads()
    assert tasks._alive_file is None and not path.exists()


def _stuck_process_script() -> str:
    return ("import threading, time\n"
            "from worker.leases import kill_this_process\n"
            "threading.Timer(0.2, kill_this_process).start()\n"
            "time.sleep(30)\n"  # the main thread stuck in a C call
            "print('still alive')\n")


def test_the_hard_limit_ends_a_process_whose_main_thread_is_stuck() -> None:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", _stuck_process_script()], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 137 and "still alive" not in run.stdout
    assert time.monotonic() - started < 20


def test_the_hard_limit_ends_a_worker_that_is_pid_1() -> None:
    """As in a container without an init process: a SIGKILL to itself would be ignored there."""
    unshare = shutil.which("unshare")
    probe: Any = subprocess.run([unshare or "unshare", "-Urpf", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("user and PID namespaces are not available here")
    run = subprocess.run([unshare or "unshare", "-Urpf", sys.executable, "-c",
                          "import os; assert os.getpid() == 1\n" + _stuck_process_script()],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 137 and "still alive" not in run.stdout, run.stderr
