"""The CUDA swap backend: kvikio (GPUDirect Storage, or its compatibility mode) straight into device or pinned memory.

kvikio needs the CUDA driver: its import fails on a CPU-only machine, so it is imported only inside the methods
here, and `nvme.open_backend` chooses this backend only where CUDA is present and the import succeeds.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from .helper_threads import helper_pool
from .swap import InflightRequests, SwapDirectory, as_bytes

__all__ = ["KvikioBackend", "KvikioSwapFile"]


def _start(op: Callable[..., Any], t: torch.Tensor, offset: int, task_size: int,
           waiters: ThreadPoolExecutor) -> Future[None]:
    """kvikio takes CUDA memory via __cuda_array_interface__ (a uint8 view sidesteps bf16, which
    has no typestr there) and host memory via the buffer protocol, which numpy provides."""
    data = as_bytes(t)
    io_future = op(data if data.is_cuda else data.numpy(), data.numel(), offset, task_size)
    # Hand-off: IOFuture.get() returns only once all of kvikio's tasks are done, so the Future
    # a waiter thread resolves never completes while kvikio still touches `data` (kept alive
    # by this very call until then).
    return waiters.submit(_result, io_future, data)


def _result(io_future: Any, data: torch.Tensor) -> None:
    done = io_future.get()
    if done != data.numel():
        raise EOFError(f"kvikio moved {done} of {data.numel()} bytes (past the end of the file?)")


class KvikioSwapFile:
    """kvikio.CuFile already splits requests into tasks on its own thread pool; this only turns
    its IOFuture into the concurrent.futures.Future the rest of the engine waits on."""

    def __init__(self, path: Path, waiters: ThreadPoolExecutor, task_size: int) -> None:
        import kvikio

        self.path = path
        self.direct = True  # kvikio opens an O_DIRECT fd itself and uses it for aligned I/O
        self._file = kvikio.CuFile(path, "r+")
        self._waiters = waiters
        self._task_size = task_size
        self._inflight = InflightRequests()

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future[None]:
        fut = _start(self._file.pread, dest, offset, self._task_size, self._waiters)
        return self._inflight.track(fut)

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future[None]:
        fut = _start(self._file.pwrite, src, offset, self._task_size, self._waiters)
        return self._inflight.track(fut)

    def sync(self) -> None:
        self._inflight.wait()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._inflight.wait()
        self._file.close()


class KvikioBackend(SwapDirectory[KvikioSwapFile]):
    """GPUDirect Storage via kvikio: NVMe <-> GPU memory without a CPU bounce where GDS is set
    up. kvikio sizes its own global thread pool and decides on O_DIRECT itself, so `workers`
    only sizes the threads waiting on its futures and `direct` exists for a uniform signature."""

    name = "kvikio"

    def __init__(self, directory: str | Path, *, workers: int = 4, request_bytes: int = 8 << 20,
                 direct: bool = True, keep_files: bool = False) -> None:
        waiters = helper_pool(workers, "kvikio-wait")
        super().__init__(directory, keep_files, waiters)
        self.direct = direct
        self._task_size = request_bytes

    def _open_file(self, path: Path) -> KvikioSwapFile:
        return KvikioSwapFile(path, self._pool, self._task_size)

    def read_range(self, path: str | Path, offset: int, dest: torch.Tensor) -> Future[None]:
        """Read `dest.nbytes` bytes at `offset` of any file (a model's .safetensors) into `dest`."""
        import kvikio

        self._check_open()
        source = kvikio.CuFile(path, "r")  # kvikio handles unaligned offsets and sizes itself
        result = _start(source.pread, dest, offset, self._task_size, self._pool)
        result.add_done_callback(lambda _: source.close())  # get() has returned: kvikio is done
        return result
