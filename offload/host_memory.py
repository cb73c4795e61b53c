"""Host memory that goes back to the OS when freed, so the process's resident size follows the engine's budget.

glibc serves allocations below its mmap threshold from heap arenas and keeps freed heap memory resident. Its
threshold is dynamic: each freed mmap-served block raises it (up to 32 MiB), so after the first large tensor
is freed every gradient temporary, activation and optimizer slice below 32 MiB comes from the heap, and the heap
only grows (measured: 620 MiB of heap for a 277M-parameter model with a 1 GiB budget, peak RSS 1.94 GiB; 1.63
GiB with the threshold fixed, and steps no slower). A fixed threshold turns the dynamic behaviour off.
A cap on the heap arenas too: glibc gives each thread that allocates an arena of its own (up to 8 a core), each
keeping freed memory; the engine runs a compute thread, an optimizer thread, a staging thread, I/O threads and a
frozen-read thread (measured on the 13B LoRA row: peak RSS 4.80 GiB, 4.75 with two arenas twice, steps no slower).
`import finetune.offload` applies both. Chunk buffers are anonymous memory maps of their own (`aligned_empty`).
"""

from __future__ import annotations

import ctypes
import mmap
import platform

import torch

from ..optim.layout import ALIGNMENT, round_up

__all__ = ["MMAP_THRESHOLD", "aligned_empty", "return_freed_memory_to_os"]

MMAP_THRESHOLD = 4 << 20
"""Allocations of at least this many bytes get their own memory map, unmapped when freed."""
MALLOC_ARENAS = 2
"""Heap arenas the process's threads share at the most (glibc's default: 8 a core)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameter numbers, glibc's malloc.h
_tuned = False


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD and cap its arenas at MALLOC_ARENAS, once per process (arenas
    made before stay). Returns whether it is in effect (False off glibc, e.g. macOS or musl, whose allocators need
    no such setting)."""
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # The trim threshold too: the dynamic rule set it to twice the raised mmap threshold (64 MiB), and free
    # memory at the top of the heap is given back only above it.
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    ) and bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    return _tuned


def aligned_empty(nbytes: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised uint8 buffer of round_up(nbytes) bytes starting on a 4096-byte boundary (O_DIRECT needs it).

    Host buffers are anonymous memory maps of their own: page-aligned by construction, and returned to the OS
    the moment they are freed. From glibc's heap they could stay resident after being freed (its dynamic mmap
    threshold rises to 32 MiB), and the process would outgrow its memory budget. Pinned buffers come from
    torch's pinned allocator, which promises only 64-byte alignment, so those are over-allocated and sliced.

    Raises:
        ValueError: `pin_memory` without CUDA.
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
