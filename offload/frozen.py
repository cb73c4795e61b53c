"""Frozen weights read straight from a model's own safetensors files: no conversion pass, no swap-file writes.

A frozen block chunk (weights only, never dirty) has a `SafetensorsSource` where a trained chunk has a swap
file: loading the chunk reads each tensor's byte range out of the `.safetensors` file it was saved in (the
range comes from the file's JSON header). A range whose file offset, destination address and length are
4096-aligned is read with O_DIRECT; others go through the backend's aligned bounce buffer, or a buffered read
when there is no NVMe backend. A tensor stored in another dtype than the chunk's is read into a temporary and
converted. Evicting the chunk drops it: the file already holds its bytes.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..optim.layout import ChunkLayout
from .nvme import pread_exact
from .safetensors_io import TensorRange, read_header, safetensors_index
from .timers import NO_TIMERS, Timers
from .weights import find_stored

__all__ = ["CONVERTING", "CONVERT_PIECE", "SafetensorsSource", "tensor_ranges"]


class SafetensorsSource:
    """Reads a frozen chunk's tensors from safetensors files: the chunk's read-only "swap file".

    Args:
        layout: the frozen chunk's element layout.
        ranges: one TensorRange per slot of `layout`, in slot order.
        dtype: the chunk's (compute) dtype.
        backend: the NVMe backend (O_DIRECT reads with bounce buffers); None reads buffered on `pool`.
        pool: the thread on which reads run when there is no backend.
        timers: receives "frozen read", the seconds each chunk read takes (reading and converting).
    """

    def __init__(
        self,
        layout: ChunkLayout,
        ranges: list[TensorRange],
        dtype: torch.dtype,
        backend: object | None,
        pool: ThreadPoolExecutor,
        timers: Timers = NO_TIMERS,
    ) -> None:
        for slot, tensor in zip(layout.slots, ranges, strict=True):
            if slot.shape != tensor.shape:
                raise ValueError(
                    f"{tensor.path} stores {slot.name} with shape {tuple(tensor.shape)}, the model has "
                    f"{tuple(slot.shape)}; is it the checkpoint of this model?"
                )
        self.layout, self.ranges, self.dtype = layout, ranges, dtype
        self.backend, self.pool, self.timers = backend, pool, timers
        self.file_bytes = sum(tensor.nbytes for tensor in ranges)  # read from the files per load, as stored
        # Shared: counted on the read thread when a read is done; read by others between steps (benchmarks).
        self.reads = 0

    def read_into(self, buffer: torch.Tensor) -> Future:
        """Fill the chunk's uint8 `buffer` (padding left as is). The future resolves once every range is in."""
        return self.pool.submit(self._read, buffer)

    def _read(self, buffer: torch.Tensor) -> None:
        start = time.perf_counter()
        flat = buffer.view(self.dtype)
        pending: deque[_Read] = deque()
        for slot, tensor in zip(self.layout.slots, self.ranges):
            view = slot.view(flat).reshape(-1)
            if tensor.dtype == self.dtype:  # straight into the chunk; these may all be in flight
                pending.append(self._start(view, tensor.path, tensor.offset, tensor.dtype))
                continue
            # A tensor stored in another dtype is read into temporaries, CONVERT_PIECE bytes at a time, at most
            # CONVERTING of them at once (one converted while the next is read): the whole chunk's would be a 13B
            # layer's 0.6 GB of bf16 beside the budget, a 13B head's alone 0.3 GB.
            values = CONVERT_PIECE // tensor.dtype.itemsize
            for start in range(0, view.numel(), values):
                while sum(read.converted for read in pending) >= CONVERTING:
                    pending.popleft().finish()
                piece = view[start : start + values]
                pending.append(self._start(piece, tensor.path, tensor.offset + start * tensor.dtype.itemsize,
                                           tensor.dtype))
        while pending:
            pending.popleft().finish()
        self.reads += 1
        self.timers.add("frozen read", time.perf_counter() - start)

    def _start(self, view: torch.Tensor, path: Path, offset: int, stored: torch.dtype) -> _Read:
        """Start reading the bytes at `offset` of `path` (as `stored`) into `view`: straight in, or through a
        temporary of the stored dtype when it is not the chunk's."""
        converted = stored != self.dtype
        nbytes = view.numel() * stored.itemsize
        target = torch.empty(nbytes, dtype=torch.uint8) if converted else view.view(torch.uint8)
        if self.backend is None:
            _pread(path, offset, target)
            return _Read(None, target, view, stored, converted)
        # Ordering: the future resolves after every piece is in `target`; `_Read.finish` waits for it.
        return _Read(self.backend.read_range(path, offset, target), target, view, stored, converted)


CONVERTING = 2
"""Temporaries of converted tensors a chunk read keeps at once (`SafetensorsSource._read`)."""
CONVERT_PIECE = 8 * 2**20
"""Bytes of the file one such temporary holds at the most: the NVMe backend's request size, so a piece is one read."""


@dataclass
class _Read:
    """One tensor's read in flight, and where its bytes go once in."""

    future: Future | None
    target: torch.Tensor
    view: torch.Tensor
    stored_dtype: torch.dtype
    converted: bool

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()
        if self.converted:
            self.view.copy_(self.target.view(self.stored_dtype))


def _pread(path: Path, offset: int, dest: torch.Tensor) -> None:
    """A buffered read of one range, for a model read without an NVMe backend."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_exact(fd, dest, offset, source=path)
    finally:
        os.close(fd)


def tensor_ranges(names: list[str], aliases: dict[str, str], directory: Path) -> list[TensorRange]:
    """Each named parameter's byte range in `directory`'s safetensors (peft names and tied aliases resolved)."""
    index = safetensors_index(directory)
    headers: dict[Path, dict[str, TensorRange]] = {}
    ranges = []
    for name in names:
        stored = find_stored(name, aliases, index)
        if stored is None:
            raise KeyError(f"{directory} has no tensor {name}; is it the checkpoint of this model's base?")
        path = index[stored]
        if path not in headers:
            headers[path] = read_header(path)
        ranges.append(headers[path][stored])
    return ranges
