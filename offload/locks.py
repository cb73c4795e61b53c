"""Advisory locks that name their holder: one run per output directory, one engine per swap directory.

`flock(2)` belongs to the open file and the kernel drops it when its holder dies, however it dies (kill -9
included), so a lock left by a killed process never blocks the next one and no stale-lock guess (is that pid
alive? how old is the file?) is needed. The holder writes its pid into the file so that a refusal can say who
holds it. The lock file is never removed while others may open it, except by `DirectoryLock.release(remove=True)`,
whose caller is about to remove the whole directory.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DirectoryLock", "LockHeld"]

LOCK_FILE = ".lock"


class LockHeld(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, directory: Path, holder: int | None, advice: str = "") -> None:
        self.directory, self.holder = directory, holder
        who = f"pid {holder}" if holder is not None else "another process"
        super().__init__(f"{directory} is in use by {who}{advice}")


class DirectoryLock:
    """An exclusive lock on `directory`, held through a `.lock` file inside it, taken without waiting."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse at once.

        Raises:
            LockHeld: a live process holds it (its pid is in the message).
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _pid_in(fd)
                os.close(fd)
                raise LockHeld(self.path.parent, holder) from None
            # Ordering: the holder before us may have removed the file between our open and our flock, leaving us
            # a lock on a name nobody sees; only a lock on the file the path names now counts.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the live process holding the lock, or None when nobody does; takes nothing, writes nothing
        (the file is opened read-only, and a lock taken to test it is dropped at once)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # no lock file (never locked), or a link planted in its place: nobody holds it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or -1
        finally:
            os.close(fd)  # drops the test lock, if taken
        return None

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock; `remove` deletes the lock file first (still holding it), for a directory about to go."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor of the open file drops the flock
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_in(fd: int) -> int | None:
    """The pid the holder wrote, or None while it is still writing it."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
