"""Byte-addressed swap files on NVMe, read and written asynchronously.

Weights and optimizer state that do not fit in memory live in plain files; the engine moves
tensors in and out by byte offset. O_DIRECT keeps those streams out of the page cache, which
would otherwise evict the very memory we are trying to save and add a copy.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from ..optim.layout import ALIGNMENT, round_up
from .helper_threads import helper_pool
from .host_memory import aligned_empty
from .kvikio_backend import KvikioBackend
from .swap import InflightRequests, SwapDirectory, as_bytes

__all__ = ["OnceWarning", "SwapFile", "ThreadPoolBackend", "fallback_warning", "open_backend", "pread_exact"]


class OnceWarning:
    """A RuntimeWarning given at most once per process, however many backends and threads run into it."""

    def __init__(self) -> None:
        self._given = False
        self._lock = threading.Lock()

    def warn(self, message: str) -> None:
        """Warn with `message`, attributed to the caller of the function that calls this, unless already given."""
        with self._lock:
            if self._given:
                return
            self._given = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


fallback_warning = OnceWarning()
"""Says that O_DIRECT is refused and buffered I/O is used instead (once: every backend after the first would
repeat it)."""


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"the thread-pool backend moves CPU tensors only, got {t.device}")
    return as_bytes(t)


def _aligned(piece: torch.Tensor, offset: int) -> bool:
    return (piece.data_ptr() | offset | piece.numel()) % ALIGNMENT == 0


def pread_exact(fd: int, dest: torch.Tensor, offset: int, at_least: int | None = None, *,
                source: str | Path = "the file") -> None:
    """Fill the CPU tensor `dest` from `fd` at `offset`. Loops because preadv may return short; `at_least` lets an
    aligned window overrun EOF.

    Raises:
        EOFError: the file (named `source` in the message) ends before `at_least` (default: all of `dest`) bytes.
    """
    view = memoryview(dest.numpy())
    need = len(view) if at_least is None else at_least
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"{source} ends at byte {offset + done}, {need - done} bytes short")
        done += n


def _pwrite_all(fd: int, src: torch.Tensor, offset: int) -> None:
    """Write all of the CPU tensor `src` to `fd` at `offset`, looping over short writes.

    Raises:
        OSError: a write made no progress (EIO), or the write's own error (ENOSPC on a full disk).
    """
    view = memoryview(src.numpy())
    done = 0
    while done < len(view):
        n = os.pwritev(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"write made no progress at byte {offset + done}")
        done += n


def _check_in_file(size: int, offset: int, nbytes: int, path: str | Path) -> None:
    """A direct read past EOF returns short or fails with EINVAL, not a clear error: check first."""
    if offset < 0 or offset + nbytes > size:
        raise EOFError(f"reading {nbytes} bytes at {offset} goes past the end of {path} "
                       f"({size} bytes)")


def _close_all(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _gather(pool: ThreadPoolExecutor, jobs: list[Callable[[], None]]) -> Future[None]:
    """One future per request that resolves only once *every* piece has finished, even after a
    failure, so the caller may free or reuse the buffer as soon as it sees the outcome."""
    combined: Future[None] = Future()
    remaining = len(jobs)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def piece_done(piece: Future[None]) -> None:
        nonlocal remaining
        with lock:
            if piece.exception() is not None:
                errors.append(piece.exception())
            remaining -= 1
            last = remaining == 0
        if last and errors:
            combined.set_exception(errors[0])
        elif last:
            combined.set_result(None)

    if not jobs:
        combined.set_result(None)
    for job in jobs:
        # Hand-off: pieces finish in any order on the pool; piece_done counts them under `lock`,
        # so `combined` is set exactly once, by whichever piece returns last.
        pool.submit(_Once(job)).add_done_callback(piece_done)
    return combined


class _Once:
    """A job that lets go of itself (and of the buffer piece it holds) as it returns, before its
    future resolves: whoever sees the request done finds no reference to the buffer left on an I/O
    thread (the activation store reuses a buffer only when its storage has no other reference)."""

    def __init__(self, job: Callable[[], None]) -> None:
        self.job: Callable[[], None] | None = job

    def __call__(self) -> None:
        job, self.job = self.job, None
        job()


def _direct_refusal(directory: Path) -> str | None:
    """Some filesystems refuse O_DIRECT at open (tmpfs), others only at the first I/O (some
    FUSE), so probe with one real aligned write. Returns why it failed, or None."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".odirect-probe-")
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
        try:
            _pwrite_all(fd, aligned_empty(ALIGNMENT), 0)
        finally:
            os.close(fd)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.unlink(probe)
    return None


class SwapFile:
    """One file in the swap directory, read and written by byte offset. Created with mode 0o600.

    Keeps a buffered fd beside the O_DIRECT one because O_DIRECT only takes pieces whose
    address, offset and length are 4096-aligned; other pieces take the slower buffered path."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor, request_bytes: int,
                 direct: bool) -> None:
        self.path = path
        self.direct = direct
        self._pool = pool
        self._request_bytes = request_bytes
        self._fd = os.open(path, os.O_RDWR)
        self._direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT) if direct else None
        self._inflight = InflightRequests()
        self._closed = False

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future[None]:
        """Start filling `dest` (a contiguous CPU tensor) from the file at `offset`.

        Raises:
            EOFError: the range goes past the end of the file (checked before any read).
        """
        data = _host_bytes(dest)
        _check_in_file(os.fstat(self._fd).st_size, offset, data.numel(), self.path)
        return self._submit(pread_exact, data, offset)

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future[None]:
        """Start writing `src` (a contiguous CPU tensor) to the file at `offset`."""
        return self._submit(_pwrite_all, _host_bytes(src), offset)

    def sync(self) -> None:
        """Direct writes skip the page cache but not the metadata (size, extents): fsync it."""
        self._inflight.wait()
        os.fsync(self._fd)

    def close(self) -> None:
        """Wait for the requests in flight, then close both descriptors."""
        if self._closed:
            return
        self._closed = True
        self._inflight.wait()
        _close_all(self._fd, self._direct_fd)

    def _submit(self, op: Callable[[int, torch.Tensor, int], None], data: torch.Tensor,
                offset: int) -> Future[None]:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        jobs: list[Callable[[], None]] = []
        for start in range(0, data.numel(), self._request_bytes):
            piece = data[start : start + self._request_bytes]
            direct = self._direct_fd is not None and _aligned(piece, offset + start)
            jobs.append(partial(op, self._direct_fd if direct else self._fd, piece, offset + start))
        return self._inflight.track(_gather(self._pool, jobs))


class ThreadPoolBackend(SwapDirectory[SwapFile]):
    """Default backend: a pool of worker threads doing os.preadv / os.pwritev (they release the
    GIL), so several requests are in flight at once and the NVMe queue never runs dry."""

    def __init__(self, directory: str | Path, *, workers: int = 4, request_bytes: int = 8 << 20,
                 direct: bool = True, keep_files: bool = False) -> None:
        if request_bytes <= 0 or request_bytes % ALIGNMENT:
            raise ValueError(f"request_bytes must be a positive multiple of {ALIGNMENT}")
        super().__init__(directory, keep_files, helper_pool(workers, "nvme-io"))
        refusal = _direct_refusal(self.directory) if direct else None
        if refusal is not None:
            fallback_warning.warn(f"O_DIRECT unavailable in {self.directory} ({refusal}); using buffered I/O")
        self.direct = direct and refusal is None
        self.name = "threadpool-odirect" if self.direct else "threadpool-buffered"
        self._request_bytes = request_bytes
        self._bounce = threading.local()

    def _open_file(self, path: Path) -> SwapFile:
        return SwapFile(path, self._pool, self._request_bytes, self.direct)

    def read_range(self, path: str | Path, offset: int, dest: torch.Tensor) -> Future[None]:
        """For files we did not write (.safetensors), whose tensors start at arbitrary offsets:
        unaligned pieces go through an aligned bounce buffer so they can still use O_DIRECT."""
        self._check_open()
        data = _host_bytes(dest)
        _check_in_file(os.stat(path).st_size, offset, data.numel(), path)
        fd = os.open(path, os.O_RDONLY)
        direct_fd = self._open_direct_readonly(path)
        jobs: list[Callable[[], None]] = []
        for start in range(0, data.numel(), self._request_bytes):
            piece = data[start : start + self._request_bytes]
            if direct_fd is None:
                jobs.append(partial(pread_exact, fd, piece, offset + start))
            elif _aligned(piece, offset + start):
                jobs.append(partial(pread_exact, direct_fd, piece, offset + start))
            else:
                jobs.append(partial(self._bounced_read, direct_fd, piece, offset + start))
        result = _gather(self._pool, jobs)
        # Ordering: _gather resolves only after every piece has returned, so no worker still
        # uses these fds when this callback closes them.
        result.add_done_callback(lambda _: _close_all(fd, direct_fd))
        return result

    def _open_direct_readonly(self, path: str | Path) -> int | None:
        if not self.direct:
            return None
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # the source may live on tmpfs or NFS: buffered reads are still correct
            return None

    def _bounced_read(self, fd: int, piece: torch.Tensor, offset: int) -> None:
        start = offset - offset % ALIGNMENT
        lead = offset - start
        bounce = getattr(self._bounce, "buffer", None)
        if bounce is None:  # one per worker thread, so at most `workers` of them exist
            bounce = self._bounce.buffer = aligned_empty(self._request_bytes + ALIGNMENT)
        window = bounce[: round_up(lead + piece.numel())]
        pread_exact(fd, window, start, at_least=lead + piece.numel())
        piece.copy_(window[lead : lead + piece.numel()])


def open_backend(directory: str | Path, *, prefer_kvikio: bool = True,
                 **kwargs: Any) -> ThreadPoolBackend | KvikioBackend:
    """The kvikio backend where CUDA and kvikio are present, else the thread pool. `kwargs` go to the backend.

    kvikio is imported only here and only with CUDA present: without the CUDA driver the
    import itself fails, which must not break CPU-only machines."""
    if prefer_kvikio and torch.cuda.is_available():
        try:
            import kvikio  # noqa: F401
        except Exception:  # missing, or installed but its native libraries fail to load
            pass
        else:
            return KvikioBackend(directory, **kwargs)
    return ThreadPoolBackend(directory, **kwargs)
