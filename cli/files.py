"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

A run can be killed at any instant (SIGKILL, power loss), and the files it leaves are what `--resume` and the
user trust next. So each is written under a temporary name in the same directory, fsynced, renamed over the
target (rename is atomic within one filesystem), and then the directory is fsynced so the rename itself is
durable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "write_atomic"]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make renames and new entries in `directory` durable (a file's fsync does not cover its name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
