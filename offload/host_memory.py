"""Host memory that goes back to the OS when freed, so the process's resident size follows the engine's budget.

Chunk buffers are anonymous memory maps of their own (`aligned_empty`); what the rest of the process allocates is
kept from piling up in glibc's heap by the settings of heap.py, applied at `import finetune.offload`.
"""

from __future__ import annotations

import mmap

import torch

from ..optim.layout import ALIGNMENT, round_up

__all__ = ["aligned_empty"]


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
