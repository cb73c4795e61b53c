"""The engine's own directory inside `Budget.nvme`: private, locked, and cleared of what a killed process left.

Several runs may share one swap disk, and other users may write into it (a shared /tmp or scratch mount). So an
engine never puts swap files straight into `Budget.nvme`: it works in a directory of its own there, mode 0700,
that nobody else can enter, so nobody can plant a file or a symbolic link where a swap file will be created, and
two runs never meet on a file name. Without a name the directory is fresh (`mkdtemp`, a random name). With a
name (the CLI names it after the run's output directory) a later process of the same run finds it again: the
directory must be ours (not a link, owned by this user, closed to others) or it is refused, and whatever a killed
process left in it is removed, and counted, before the first swap file is made, except the swap versions that
the run's kept checkpoints reference (checkpoint.py: a checkpoint in swap lives there). The area's lock (locks.py) keeps
two live engines out of one directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from .locks import LOCK_FILE, DirectoryLock, LockHeld

__all__ = ["AREA_PREFIX", "SwapArea"]

AREA_PREFIX = "finetune-"


class SwapArea:
    """A private directory for one engine's swap files (`open` makes or finds it)."""

    def __init__(self, path: Path, lock: DirectoryLock, reclaimed: int, made_parent: bool) -> None:
        self.path = path
        self.reclaimed = reclaimed
        """Bytes of disk freed at open: the files an earlier, killed process of the same name left."""
        self._lock = lock
        self._made_parent = made_parent

    @classmethod
    def open(cls, parent: str | Path, name: str | None = None, *, keep: frozenset[str] = frozenset()) -> SwapArea:
        """Make (or, by `name`, find again) this engine's directory in `parent`, lock it and clear it of all but
        the files named in `keep` (swap versions that kept checkpoints reference).

        Raises:
            PermissionError: the named directory exists but is not ours alone (a link, another user's, or open
                to others); the message says what to do.
            LockHeld: a live engine works in it.
        """
        parent = Path(parent)
        made_parent = not parent.exists()
        path = _make(parent, name)
        _check_private(path)
        lock = DirectoryLock(path)
        try:
            lock.acquire()
        except LockHeld as held:
            raise LockHeld(path, held.holder, "; wait for that engine to close, or use another Budget.nvme") from None
        return cls(path, lock, _clear(path, keep), made_parent)

    def close(self, *, keep: bool = False) -> None:
        """Unlock; unless `keep`, remove the directory when nothing but the lock is left in it."""
        empty = not [entry for entry in os.listdir(self.path) if entry != LOCK_FILE]
        self._lock.release(remove=empty and not keep)
        if empty and not keep:
            for directory in (self.path, self.path.parent) if self._made_parent else (self.path,):
                try:
                    directory.rmdir()
                except OSError:  # another engine came in between (its lock file, its own area): it is its now
                    return


def _make(parent: Path, name: str | None) -> Path:
    """The area's directory in `parent`: fresh (without a name), or made or found by its name."""
    for _ in range(3):  # another engine that made `parent` may remove it, empty, between our mkdir and ours
        parent.mkdir(parents=True, exist_ok=True)
        try:
            if name is None:
                return Path(tempfile.mkdtemp(prefix=AREA_PREFIX, dir=parent))  # 0700, a name nobody can guess
            path = parent / f"{AREA_PREFIX}{name}"
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                pass  # left by an earlier process of this run, or planted: `open` checks it next
            return path
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"swap directory {parent} keeps disappearing; pass one that stays")


def _check_private(path: Path) -> None:
    """Refuse a directory that anyone but us could have put files in."""
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & 0o077:
        problem = f"is open to other users (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        raise PermissionError(
            f"swap directory {path} {problem}, so its files could be another's; finetune did not use it: remove it, "
            "or choose another swap directory"
        )


def _clear(path: Path, keep: frozenset[str]) -> int:
    """Remove everything in `path` but the lock and `keep`, without following links; returns the disk space freed."""
    freed = 0
    for entry in os.scandir(path):
        if entry.name == LOCK_FILE or entry.name in keep and entry.is_file(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            freed += sum(_allocated(Path(root) / f) for root, _, files in os.walk(entry.path) for f in files)
            shutil.rmtree(entry.path)
        else:
            freed += _allocated(Path(entry.path))
            os.unlink(entry.path)
    return freed


def _allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512
