"""glibc's heap settings that make freed memory go back to the OS, so the process's resident size follows the
engine's budget rather than its history.

glibc serves allocations below its mmap threshold from heap arenas and keeps freed heap memory resident. Its
threshold is dynamic: each freed mmap-served block raises it (up to 32 MiB), so after the first large tensor
is freed every gradient temporary, activation and optimizer slice below 32 MiB comes from the heap, and the heap
only grows (measured: 620 MiB of heap for a 277M-parameter model with a 1 GiB budget, peak RSS 1.94 GiB; 1.63
GiB with the threshold fixed, and steps no slower). A fixed threshold turns the dynamic behaviour off.
A cap on the heap arenas too: glibc gives each thread that allocates an arena of its own (up to 8 a core), each
keeping freed memory; the engine runs a compute thread, an optimizer thread, a staging thread, I/O threads and a
frozen-read thread (measured on the 13B LoRA row: peak RSS 4.80 GiB, 4.75 with two arenas twice, steps no slower).
`import finetune.offload` applies both; this module imports nothing heavy, so that import stays light.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["MALLOC_ARENAS", "MMAP_THRESHOLD", "return_freed_memory_to_os"]

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
