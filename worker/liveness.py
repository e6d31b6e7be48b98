"""The worker's liveness file, for container health checks.

`celery inspect ping` cannot tell a training worker from a dead one: a solo-pool worker (every GPU worker)
runs its task on the thread that answers remote-control commands, so it stays silent for the whole job
and an orchestrator acting on that would kill it mid-training. Instead a daemon thread of the worker
process rewrites a file every few seconds; `python -m worker.liveness` says whether it is recent. Each
worker needs its own file (each compose container has its own /tmp). The thread
keeps running while a job trains, and stops when the process dies or is stuck holding the interpreter
(the case a restart helps; a job stuck in a C call that lets go of it is the lease heartbeat's hard
limit's to end).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TOUCH_EVERY_S = 10.0


class AliveFile:
    """Rewrites `path` with the time and pid every `every_s` seconds on a daemon thread."""

    def __init__(self, path: Path, *, every_s: float = TOUCH_EVERY_S) -> None:
        self.path, self.every_s = Path(path), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-alive-file", daemon=True)

    def start(self) -> None:
        """Write the file now and start the thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.touch()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and remove the file (a stopped worker is not alive)."""
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def touch(self) -> None:
        """Write the file once (atomically: a temp file renamed over it)."""
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staging.write_text(f"{time.time():.3f} {os.getpid()}\n")
        os.replace(staging, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.touch()
            except OSError as error:  # a full or read-only disk: the check will say the file is stale
                logger.warning("could not write the worker's liveness file %s: %s", self.path, error)


def check_alive(path: Path, *, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
    """(alive, why): whether the worker wrote `path` within the last `max_age_s` seconds."""
    try:
        age = (time.time() if now is None else now) - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False, f"{path} does not exist: the worker has not started, or it stopped"
    if age > max_age_s:
        return False, f"{path} was last written {age:.0f} s ago (limit {max_age_s:g} s): the worker is stuck or gone"
    return True, f"{path} written {max(age, 0.0):.0f} s ago"


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.liveness [--max-age-s S]`: exit 0 when RXVERIFY_WORKER_ALIVE_FILE is recent.

    Light on purpose (no torch, no Celery): a container health check runs it every 30 s beside training.
    """
    import argparse

    from app.config import get_settings

    parser = argparse.ArgumentParser(prog="python -m worker.liveness", description=main.__doc__)
    parser.add_argument("--max-age-s", type=float, default=60.0, help="oldest accepted write (default 60 s)")
    args = parser.parse_args(argv)
    path = get_settings().worker_alive_file
    if path is None:
        print("RXVERIFY_WORKER_ALIVE_FILE is not set: the worker writes no liveness file to check")
        return 2
    alive, why = check_alive(path, max_age_s=args.max_age_s)
    print(why)
    return 0 if alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
