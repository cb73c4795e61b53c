"""What every NVMe backend shares: the swap directory's files, the requests in flight, and the protocols the store
sees.

A backend (the thread pool of `nvme.py`, kvikio in `kvikio_backend.py`) opens byte-addressed swap files in one
directory and reads and writes them asynchronously. Creating, preallocating and removing those files, and waiting
for a file's requests before its descriptor is closed, are the same for both; only the I/O differs.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from ..optim.layout import round_up

__all__ = [
    "InflightRequests", "SwapBackend", "SwapDirectory", "SwapFileIO", "as_bytes", "completed", "write_failed",
]


def write_failed(directory: object, error: BaseException) -> OSError:
    """The error training stops with after a swap write failed (disk full, I/O error): the bytes stayed in memory."""
    return OSError(
        f"writing a swap file in {directory} failed ({error}); nothing was lost from memory, but training cannot go "
        "on: free space there or choose another Budget.nvme"
    )


def completed(value: object = None) -> Future:
    """A future already resolved with `value`: a request that needed no I/O."""
    future: Future = Future()
    future.set_result(value)
    return future


class SwapFileIO(Protocol):
    """One swap file as the store uses it: asynchronous reads and writes by byte offset."""

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future[None]:
        """Start filling `dest` from the file at `offset`; the future resolves once every byte is in."""
        ...

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future[None]:
        """Start writing `src` to the file at `offset`; the future resolves once every byte is written."""
        ...

    def sync(self) -> None:
        """Wait for the file's requests, then make its bytes durable."""
        ...

    def close(self) -> None:
        """Wait for the file's requests, then close it."""
        ...


class SwapBackend(Protocol):
    """A swap directory that opens one file per chunk (what `ChunkStore` needs of a backend)."""

    directory: Path

    def open(self, name: str, nbytes: int) -> SwapFileIO:
        """The swap file `name` in the directory, at least `nbytes` long."""
        ...

    def remove(self, swap: Any) -> None:
        """Close a file `open` returned and give back its disk space."""
        ...

    def keep(self, swap: Any) -> None:
        """Never remove `swap`'s file, not even on close (a checkpoint references it)."""
        ...

    def own(self, swap: Any) -> None:
        """Remove `swap`'s file on close again (no checkpoint references it any more)."""
        ...

    def detach(self, swap: Any) -> None:
        """Close `swap` and leave its file on disk."""
        ...

    def delete(self, name: str) -> None:
        """Remove the file `name` of the directory, closed and not in use."""
        ...


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Files hold bytes whatever the dtype; a flat uint8 view shares the tensor's memory.

    Raises:
        ValueError: `t` is not contiguous (its bytes are not one range).
    """
    if not t.is_contiguous():
        raise ValueError("swap I/O needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


class InflightRequests:
    """Closing an fd while a worker still uses it could let an unrelated open() reuse the number
    and receive our writes, so close() waits for the requests tracked here."""

    def __init__(self) -> None:
        self._futures: set[Future[None]] = set()
        self._lock = threading.Lock()

    def track(self, fut: Future[None]) -> Future[None]:
        """Remember `fut` until it resolves; returns it."""
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._discard)  # runs at once if already done
        return fut

    def _discard(self, fut: Future[None]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def wait(self) -> None:
        """Block until every request tracked so far has resolved."""
        with self._lock:
            pending = list(self._futures)
        wait(pending)


def _create_preallocated(path: Path, nbytes: int) -> bool:
    """Reserving blocks up front avoids fragmentation and ENOSPC halfway through training.
    Returns whether the file is new, so that close() removes only files we made.

    Raises:
        PermissionError: `path` exists and is a symbolic link, not a regular file, or another user's: training
            state is never written through a link or into a file someone else can read or replace.
    """
    try:
        fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), True
    except FileExistsError:
        fd, created = _open_own(path), False
    try:
        try:
            os.posix_fallocate(fd, 0, round_up(nbytes))
        except OSError as e:  # unsupported by the filesystem: a sparse file works too
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            if os.fstat(fd).st_size < round_up(nbytes):
                os.ftruncate(fd, round_up(nbytes))
    finally:
        os.close(fd)
    return created


def _open_own(path: Path) -> int:
    """Open an existing swap file (kept by `keep_files`) only if it is a regular file of ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PermissionError(f"swap file {path} is a symbolic link; finetune never writes through one: remove "
                                  "it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        whose = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"owned by another user (uid {info.st_uid})"
        raise PermissionError(f"swap file {path} is {whose}; finetune did not use it: remove it")
    return fd


_File = TypeVar("_File", bound=SwapFileIO)


class SwapDirectory(Generic[_File]):
    """Bookkeeping both backends share. Only what this backend created is removed on close, so
    a directory reused across runs (keep_files=True) or shared with others is left intact.

    A backend subclasses it with its file type and implements `_open_file` (and `read_range`).

    Args:
        directory: the swap directory; created (mode 0o700) if missing, and then removed on close if empty.
        keep_files: leave the swap files (and the directory) in place on close.
        pool: the threads the backend's requests run or wait on; shut down on close.
    """

    def __init__(self, directory: str | Path, keep_files: bool, pool: ThreadPoolExecutor) -> None:
        self.directory = Path(directory)
        self._created_dir = not self.directory.exists()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._keep_files = keep_files
        self._pool = pool
        self._files: list[_File] = []
        self._created: list[Path] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"backend for {self.directory} is closed")

    def open(self, name: str, nbytes: int) -> _File:
        """The swap file `name` in the directory, created (mode 0o600) if new, with `nbytes` preallocated.

        Raises:
            ValueError: the backend is closed, or `name` is not a bare file name.
        """
        self._check_open()
        if Path(name).name != name:
            raise ValueError(f"swap file name must be a bare file name, got {name!r}")
        path = self.directory / name
        if _create_preallocated(path, nbytes):
            self._created.append(path)
        swap = self._open_file(path)
        self._files.append(swap)
        return swap

    def _open_file(self, path: Path) -> _File:
        """The backend's file object for the existing, preallocated `path`."""
        raise NotImplementedError

    def remove(self, swap: _File) -> None:
        """Close `swap` (it waits for its requests) and delete its file if this backend created it."""
        swap.close()
        self._files.remove(swap)
        path = swap.path
        if path in self._created:
            self._created.remove(path)
            path.unlink(missing_ok=True)

    def keep(self, swap: _File) -> None:
        """Never remove `swap`'s file, not even on close: a checkpoint references it."""
        if swap.path in self._created:
            self._created.remove(swap.path)

    def own(self, swap: _File) -> None:
        """Remove `swap`'s file when it is removed or on close, as if this backend had created it."""
        if swap.path not in self._created:
            self._created.append(swap.path)

    def detach(self, swap: _File) -> None:
        """Close `swap` (it waits for its requests) and leave its file on disk, for whoever references it."""
        swap.close()
        self._files.remove(swap)

    def delete(self, name: str) -> None:
        """Remove the closed file `name`: a version nothing references any more."""
        self._check_open()
        path = self.directory / name
        if path in self._created:
            self._created.remove(path)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close every file (each waits for its requests), then remove what this backend created."""
        if self._closed:
            return
        self._closed = True
        for swap in self._files:
            swap.close()
        self._pool.shutdown(wait=True)  # read_range requests belong to no file: wait here
        if self._keep_files:
            return
        for path in self._created:
            path.unlink(missing_ok=True)
        if self._created_dir and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
