"""`rxverify up` as a real subprocess (what `make run` runs), shrunk through RXVERIFY_ settings for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# A first run in seconds: 12 photos of the largest product (6 of most), 32 px photos, a 16 px tiny CNN, 2 epochs.
SHRUNK = {"RXVERIFY_DEMO_ARCH": "tiny_cnn", "RXVERIFY_DEMO_PER_CLASS": "12", "RXVERIFY_DEMO_PHOTO_SIZE": "32",
          "RXVERIFY_DEMO_IMAGE_SIZE": "16", "RXVERIFY_DEMO_EPOCHS": "2", "RXVERIFY_TORCH_THREADS": "1",
          "RXVERIFY_LOG_FORMAT": "text"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def up_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a shrunk `rxverify up` in data_dir on port (no RXVERIFY_ variable leaks in)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RXVERIFY_")}
    return {**env, **SHRUNK, "RXVERIFY_DATA_DIR": str(data_dir), "RXVERIFY_PORT": str(port), **extra}


@dataclass
class UpProcess:
    """A running `rxverify up`: its process, port and captured output."""

    process: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything it printed on stdout so far."""
        return self.stdout.read_text()

    def logs(self, tail: int = 4000) -> str:
        """The end of stdout and stderr, for assertion messages."""
        return f"--- stdout\n{self.output()[-tail:]}\n--- stderr\n{self.stderr.read_text()[-tail:]}"

    def wait_ready(self, *, timeout_s: float) -> float:
        """Seconds until /readyz answered 200 (fails when the process exits or time runs out)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise AssertionError(f"rxverify up exited with {self.process.returncode}\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"/readyz did not answer 200 within {timeout_s:.0f} s\n{self.logs()}")

    def interrupt(self, *, timeout_s: float = 60.0) -> int:
        """Ctrl-C (SIGINT), then its exit status (killed after timeout_s: that is a test failure)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"rxverify up did not stop within {timeout_s:.0f} s of SIGINT\n{self.logs()}") \
                from None


def start_up(env: dict[str, str], *, logs_dir: Path, name: str = "up") -> UpProcess:
    """Start `python -m app.cli up` from the repository root with `env` (RXVERIFY_PORT names the port)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs_dir / f"{name}.out", logs_dir / f"{name}.err"
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], cwd=ROOT, env=env,
                               stdout=stdout.open("wb"), stderr=stderr.open("wb"), stdin=subprocess.DEVNULL)
    return UpProcess(process=process, port=int(env["RXVERIFY_PORT"]), stdout=stdout, stderr=stderr)


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))
