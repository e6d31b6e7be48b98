"""Atomic file writes: a temp file of a unique name beside the target, fsynced, then renamed over it.

Readers see the old file or the whole new one, never half of it; a write that fails leaves no temp file.
The name is unique per write (not per process): writers in different containers may share a PID.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temp_prefix(path: Path) -> str:
    """The name prefix of `atomic_write`'s temp files for `path` (a writer killed mid-write leaves one)."""
    return f".{path.name}.tmp-"


@contextlib.contextmanager
def atomic_write(path: Path, *, prefix: str | None = None, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces `path` when the block ends without an exception.

    The temp file is `<prefix><random>` in `path`'s folder (default prefix `temp_prefix(path)`), created
    owner-only (0600); `mode` sets other permissions before the rename.
    """
    descriptor, staging = tempfile.mkstemp(prefix=prefix if prefix is not None else temp_prefix(path),
                                           dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(staging, mode)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
