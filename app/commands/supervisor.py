"""Embedded mode: `rxverify serve` runs one local Celery worker process and keeps it alive.

The worker is `python -m app.cli worker --exit-with-parent PID`, started in its own session (so a
terminal's Ctrl-C reaches only the server, which then stops the worker in order), restarted with a
growing back-off whenever it dies, and terminated (SIGTERM, then SIGKILL) when the server exits. If
the server itself is killed, the worker notices its parent is gone and shuts down.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

STABLE_AFTER_S = 60.0  # a worker that ran this long resets the restart back-off


def embedded_worker_command(*, parent_pid: int) -> list[str]:
    """The local worker's command line (the same `rxverify worker` an operator would run)."""
    return [sys.executable, "-m", "app.cli", "worker", "--exit-with-parent", str(parent_pid)]


class WorkerSupervisor:
    """Start one worker process, restart it when it dies, stop it on request."""

    def __init__(self, command: Sequence[str], *, max_backoff_s: float = 30.0) -> None:
        self.command = list(command)
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        """Spawn the worker and the thread that watches it."""
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # Its own session: Ctrl-C in the terminal goes to the server only; we stop the worker in order.
            self.process = subprocess.Popen(self.command, start_new_session=True)
            logger.info("started the local training worker (pid %d)", self.process.pid)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = 1.0
            logger.error("the local training worker (pid %d) exited with status %s; restarting in %.0f s",
                         process.pid, code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            self.restarts += 1
            self._spawn()

    def stop(self, *, timeout_s: float = 20.0) -> None:
        """Stop watching, ask the worker to finish (SIGTERM: warm shutdown), kill it if it will not."""
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            logger.info("stopping the local training worker (pid %d): warm shutdown", process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the local worker did not stop within %.0f s; killing it", timeout_s)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def watch_parent(parent_pid: int, *, interval_s: float = 1.0) -> threading.Thread:
    """In the worker: shut down (SIGTERM to ourselves, a warm shutdown) once the supervising server is gone."""

    def run() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent_pid:
                logger.warning("the supervising server (pid %d) is gone; shutting the worker down", parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def wants_embedded_worker(settings: Any, choice: bool | None) -> bool:
    """Run a local worker when asked, or by default when the broker is the embedded (SQLAlchemy) one."""
    if choice is not None:
        return choice
    return str(settings.broker_url).startswith("sqla+")
