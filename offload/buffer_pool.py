"""Freed host-memory buffers kept for the next chunk of the same size.

Most chunks of a model share a few sizes, so a buffer freed by one chunk is what the next load of that size
needs: reusing it means steady-state streaming neither page-faults fresh memory nor churns the allocator. Kept
buffers still occupy RAM, so the owner (`ChunkStore`) counts them against its budgets and trims the pool to the
room its tiers leave. A buffer let go of here goes back to the OS (see `host_memory.aligned_empty`). On CPU both
tiers are one RAM and share one pool, bounded by the two budgets together (a chunk moving between them changes
only its accounting, so separate pools would keep buffers in the wrong one). CUDA device memory is left to torch's
caching allocator. The activation store (activations.py) keeps its CPU buffers in one too, for the same reason.

Note: [Kept buffers are reused] A buffer given to the pool is handed to the next chunk of its size, so it may be
given only once nobody holds a view of it: a stale view would read another chunk's bytes.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from .chunks import Tier

__all__ = ["BufferPool"]


class BufferPool:
    """Free buffers by size, for the chunks of the memory tiers in `tiers`. Not thread-safe: the store calls it
    under its own lock.

    Args:
        tiers: the tiers whose buffers it keeps: the host tier, and on CPU (one RAM) the device tier too.
    """

    def __init__(self, tiers: Collection[Tier]) -> None:
        self.tiers = frozenset(tiers)
        self._free: dict[int, list[torch.Tensor]] = {}  # buffer size -> kept buffers
        self.nbytes = 0  # bytes of the buffers kept

    def give(self, buffer: torch.Tensor, nbytes: int) -> None:
        """Keep `buffer` (`nbytes` long, held by no one: see Note [Kept buffers are reused]) for reuse."""
        self._free.setdefault(nbytes, []).append(buffer)
        self.nbytes += nbytes

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A kept buffer of `nbytes`, or None when there is none."""
        kept = self._free.get(nbytes)
        if not kept:
            return None
        self.nbytes -= nbytes
        return kept.pop()

    def trim(self, room: int, spare: int) -> None:
        """Let kept buffers go, largest first, until they fit in `room` bytes, sparing one of `spare` bytes (the
        caller is about to take it, so it is not counted)."""
        spared = spare if self._free.get(spare) else 0
        while self.nbytes - spared > room:
            size = max(size for size, kept in self._free.items() if len(kept) > (size == spared))
            self._free[size].pop()  # the last reference: the memory goes back to the OS (see aligned_empty)
            self.nbytes -= size
