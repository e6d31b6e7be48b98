"""A progress line for long commands: redrawn in place on a terminal, plain throttled lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def bar(fraction: float, *, width: int = 24) -> str:
    """`[#########---------------]  37%` for a fraction in [0, 1]."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {100 * fraction:3.0f}%"


class Eta:
    """Remaining seconds at the rate measured since the first report, or None before a second one.

    The time before the first item is done holds the start-up (worker processes, data-loader workers,
    first allocations): at the whole-run rate an early estimate came out many times too long (the demo
    rendering's first line said 1269 s for 8 s of work). Reports after a resume start the clock afresh.
    """

    def __init__(self) -> None:
        self._first: tuple[float, float] | None = None

    def __call__(self, *, elapsed_s: float, done: float, total: float) -> float | None:
        if self._first is None:
            self._first = (elapsed_s, done)
        first_elapsed, first_done = self._first
        if done >= total:
            return 0.0
        if done <= first_done:
            return None
        return max(elapsed_s - first_elapsed, 0.0) / (done - first_done) * (total - done)


def eta_text(eta_s: float | None) -> str:
    """`ETA 42s`, or `ETA --` while unknown."""
    return "ETA --" if eta_s is None else f"ETA {eta_s:.0f}s"


class ProgressLine:
    """One status line on `stream` (stderr): a single updating line on a TTY, a line every few seconds elsewhere.

    `update(text)` is throttled (`tty_every_s` / `plain_every_s`); `update(text, force=True)` always
    writes (ends of epochs, the last item), and `done(text)` writes the final state and ends the line.
    """

    def __init__(self, stream: TextIO | None = None, *, tty_every_s: float = 0.25, plain_every_s: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = tty_every_s if self.tty else plain_every_s
        self._last = -float("inf")
        self._open = False  # a redrawn line is on screen without its newline yet

    def update(self, text: str, *, force: bool = False) -> None:
        """Show `text` (unless the last write was too recent and `force` is not set)."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")  # carriage return, then clear what the longer last line left
            self._open = True
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def done(self, text: str | None = None) -> None:
        """Write the final state (if given) and end the line."""
        if text is not None:
            self.update(text, force=True)
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
