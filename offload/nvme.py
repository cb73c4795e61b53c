"""Byte-addressed swap files on NVMe, read and written asynchronously.

Weights and optimizer state that do not fit in memory live in plain files; the engine moves
tensors in and out by byte offset. O_DIRECT keeps those streams out of the page cache, which
would otherwise evict the very memory we are trying to save and add a copy.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from ..optim.layout import ALIGNMENT, round_up

_fallback_warned = False
_fallback_lock = threading.Lock()


def aligned_empty(nbytes: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised uint8 buffer of round_up(nbytes) bytes starting on a 4096-byte boundary (O_DIRECT needs it).

    Host buffers are anonymous memory maps of their own: page-aligned by construction, and returned to the OS
    the moment they are freed. From glibc's heap they could stay resident after being freed (its dynamic mmap
    threshold rises to 32 MiB), and the process would outgrow its memory budget. Pinned buffers come from
    torch's pinned allocator, which promises only 64-byte alignment, so those are over-allocated and sliced.
    """
    size = round_up(nbytes)
    if pin_memory:
        if not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, but torch.cuda.is_available() is False")
        raw = torch.empty(size + ALIGNMENT, dtype=torch.uint8, pin_memory=True)
        shift = -raw.data_ptr() % ALIGNMENT
        return raw[shift : shift + size]
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    private = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # Python's default is MAP_SHARED
    return torch.frombuffer(private, dtype=torch.uint8)  # the tensor keeps the map alive


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Files hold bytes whatever the dtype; a flat uint8 view shares the tensor's memory."""
    if not t.is_contiguous():
        raise ValueError("swap I/O needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"the thread-pool backend moves CPU tensors only, got {t.device}")
    return _as_bytes(t)


def _aligned(piece: torch.Tensor, offset: int) -> bool:
    return (piece.data_ptr() | offset | piece.numel()) % ALIGNMENT == 0


def _pread_exact(fd: int, dest: torch.Tensor, offset: int, at_least: int | None = None) -> None:
    """Loops because preadv may return short; `at_least` lets an aligned window overrun EOF."""
    view = memoryview(dest.numpy())
    need = len(view) if at_least is None else at_least
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"end of file at byte {offset + done}, {need - done} bytes short")
        done += n


def _pwrite_all(fd: int, src: torch.Tensor, offset: int) -> None:
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
        pool.submit(job).add_done_callback(piece_done)
    return combined


class _Inflight:
    """Closing an fd while a worker still uses it could let an unrelated open() reuse the number
    and receive our writes, so close() waits for the requests tracked here."""

    def __init__(self) -> None:
        self._futures: set[Future[None]] = set()
        self._lock = threading.Lock()

    def track(self, fut: Future[None]) -> Future[None]:
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._discard)  # runs at once if already done
        return fut

    def _discard(self, fut: Future[None]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def wait(self) -> None:
        with self._lock:
            pending = list(self._futures)
        wait(pending)


def _create_preallocated(path: Path, nbytes: int) -> bool:
    """Reserving blocks up front avoids fragmentation and ENOSPC halfway through training.
    Returns whether the file is new, so that close() removes only files we made."""
    try:
        fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        fd, created = os.open(path, os.O_RDWR), False
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


def _warn_buffered_once(directory: Path, reason: str) -> None:
    global _fallback_warned
    with _fallback_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    warnings.warn(f"O_DIRECT unavailable in {directory} ({reason}); using buffered I/O",
                  RuntimeWarning, stacklevel=3)


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
        self._inflight = _Inflight()
        self._closed = False

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future[None]:
        data = _host_bytes(dest)
        _check_in_file(os.fstat(self._fd).st_size, offset, data.numel(), self.path)
        return self._submit(_pread_exact, data, offset)

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future[None]:
        return self._submit(_pwrite_all, _host_bytes(src), offset)

    def sync(self) -> None:
        """Direct writes skip the page cache but not the metadata (size, extents): fsync it."""
        self._inflight.wait()
        os.fsync(self._fd)

    def close(self) -> None:
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


class _SwapDirectory:
    """Bookkeeping both backends share. Only what this backend created is removed on close, so
    a directory reused across runs (keep_files=True) or shared with others is left intact."""

    _pool: ThreadPoolExecutor
    _files: list[Any]

    def __init__(self, directory: str | Path, keep_files: bool) -> None:
        self.directory = Path(directory)
        self._created_dir = not self.directory.exists()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._keep_files = keep_files
        self._files = []
        self._created: list[Path] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"backend for {self.directory} is closed")

    def _prepare(self, name: str, nbytes: int) -> Path:
        self._check_open()
        if Path(name).name != name:
            raise ValueError(f"swap file name must be a bare file name, got {name!r}")
        path = self.directory / name
        if _create_preallocated(path, nbytes):
            self._created.append(path)
        return path

    def close(self) -> None:
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


class ThreadPoolBackend(_SwapDirectory):
    """Default backend: a pool of worker threads doing os.preadv / os.pwritev (they release the
    GIL), so several requests are in flight at once and the NVMe queue never runs dry."""

    def __init__(self, directory: str | Path, *, workers: int = 4, request_bytes: int = 8 << 20,
                 direct: bool = True, keep_files: bool = False) -> None:
        if request_bytes <= 0 or request_bytes % ALIGNMENT:
            raise ValueError(f"request_bytes must be a positive multiple of {ALIGNMENT}")
        super().__init__(directory, keep_files)
        refusal = _direct_refusal(self.directory) if direct else None
        if refusal is not None:
            _warn_buffered_once(self.directory, refusal)
        self.direct = direct and refusal is None
        self.name = "threadpool-odirect" if self.direct else "threadpool-buffered"
        self._request_bytes = request_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvme-io")
        self._bounce = threading.local()

    def open(self, name: str, nbytes: int) -> SwapFile:
        swap = SwapFile(self._prepare(name, nbytes), self._pool, self._request_bytes, self.direct)
        self._files.append(swap)
        return swap

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
                jobs.append(partial(_pread_exact, fd, piece, offset + start))
            elif _aligned(piece, offset + start):
                jobs.append(partial(_pread_exact, direct_fd, piece, offset + start))
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
        _pread_exact(fd, window, start, at_least=lead + piece.numel())
        piece.copy_(window[lead : lead + piece.numel()])


def _kvikio_start(op: Callable[..., Any], t: torch.Tensor, offset: int, task_size: int,
                  waiters: ThreadPoolExecutor) -> Future[None]:
    """kvikio takes CUDA memory via __cuda_array_interface__ (a uint8 view sidesteps bf16, which
    has no typestr there) and host memory via the buffer protocol, which numpy provides."""
    data = _as_bytes(t)
    io_future = op(data if data.is_cuda else data.numpy(), data.numel(), offset, task_size)
    # Hand-off: IOFuture.get() returns only once all of kvikio's tasks are done, so the Future
    # a waiter thread resolves never completes while kvikio still touches `data` (kept alive
    # by this very call until then).
    return waiters.submit(_kvikio_result, io_future, data)


def _kvikio_result(io_future: Any, data: torch.Tensor) -> None:
    done = io_future.get()
    if done != data.numel():
        raise EOFError(f"kvikio moved {done} of {data.numel()} bytes (past the end of the file?)")


class _KvikioSwapFile:
    """kvikio.CuFile already splits requests into tasks on its own thread pool; this only turns
    its IOFuture into the concurrent.futures.Future the rest of the engine waits on."""

    def __init__(self, path: Path, waiters: ThreadPoolExecutor, task_size: int) -> None:
        import kvikio

        self.path = path
        self.direct = True  # kvikio opens an O_DIRECT fd itself and uses it for aligned I/O
        self._file = kvikio.CuFile(path, "r+")
        self._waiters = waiters
        self._task_size = task_size
        self._inflight = _Inflight()

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future[None]:
        fut = _kvikio_start(self._file.pread, dest, offset, self._task_size, self._waiters)
        return self._inflight.track(fut)

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future[None]:
        fut = _kvikio_start(self._file.pwrite, src, offset, self._task_size, self._waiters)
        return self._inflight.track(fut)

    def sync(self) -> None:
        self._inflight.wait()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._inflight.wait()
        self._file.close()


class KvikioBackend(_SwapDirectory):
    """GPUDirect Storage via kvikio: NVMe <-> GPU memory without a CPU bounce where GDS is set
    up. kvikio sizes its own global thread pool and decides on O_DIRECT itself, so `workers`
    only sizes the threads waiting on its futures and `direct` exists for a uniform signature."""

    name = "kvikio"

    def __init__(self, directory: str | Path, *, workers: int = 4, request_bytes: int = 8 << 20,
                 direct: bool = True, keep_files: bool = False) -> None:
        super().__init__(directory, keep_files)
        self.direct = direct
        self._task_size = request_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvikio-wait")

    def open(self, name: str, nbytes: int) -> _KvikioSwapFile:
        swap = _KvikioSwapFile(self._prepare(name, nbytes), self._pool, self._task_size)
        self._files.append(swap)
        return swap

    def read_range(self, path: str | Path, offset: int, dest: torch.Tensor) -> Future[None]:
        import kvikio

        self._check_open()
        source = kvikio.CuFile(path, "r")  # kvikio handles unaligned offsets and sizes itself
        result = _kvikio_start(source.pread, dest, offset, self._task_size, self._pool)
        result.add_done_callback(lambda _: source.close())  # get() has returned: kvikio is done
        return result


def open_backend(directory: str | Path, *, prefer_kvikio: bool = True,
                 **kwargs: Any) -> ThreadPoolBackend | KvikioBackend:
    """kvikio is imported only here and only with CUDA present: without the CUDA driver the
    import itself fails, which must not break CPU-only machines."""
    if prefer_kvikio and torch.cuda.is_available():
        try:
            import kvikio  # noqa: F401
        except Exception:  # missing, or installed but its native libraries fail to load
            pass
        else:
            return KvikioBackend(directory, **kwargs)
    return ThreadPoolBackend(directory, **kwargs)
