"""Files and directories that are complete or absent, never half written, and that stay so after a crash.

A run can be killed at any instant (SIGKILL, power loss), and what it leaves is what `--resume` and the user
trust next. So everything is written under a temporary name in the same directory, fsynced, renamed over its
target (rename is atomic within one filesystem), and then the directory holding it is fsynced, so that the rename
itself is durable (a file's fsync does not cover its name).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "fsync_directory", "fsync_tree", "write_atomic"]


def fsync_directory(directory: Path) -> None:
    """Make renames and new entries in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then each directory, so a rename after this publishes only bytes
    that are on the disk."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(root))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically and durably: a reader sees the old file or the new one."""
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
    fsync_directory(path.parent)  # the rename itself is durable only once the parent is synced


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes `final` in one rename, on error it is removed.

    Raises:
        FileExistsError: `final` exists already (a checkpoint is never overwritten in place).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists already; choose a new checkpoint directory or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crash: never complete, safe to drop
    temporary.mkdir()
    try:
        yield temporary
        fsync_tree(temporary)
        os.rename(temporary, final)
        fsync_directory(final.parent)  # the rename itself is durable only once the parent is synced
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
