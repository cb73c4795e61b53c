"""Chunks: one flat, 4096-byte-aligned buffer per (block, role), the unit of placement and I/O.

PatrickStar's idea: moving one big buffer is cheaper and simpler than moving many small tensors, and a flat
buffer whose address and length are multiples of 4096 can go to disk with O_DIRECT without a bounce copy.
The element layout inside a chunk is `optim.layout.ChunkLayout`; this module holds where a chunk's bytes are.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

__all__ = ["Chunk", "Tier"]


class Tier(enum.Enum):
    """The memory tiers a chunk's bytes can be held in, fastest first (below them: its NVMe swap file)."""

    DEVICE = "device"
    HOST = "host"


@dataclass(eq=False)
class Chunk:
    """One flat buffer's bookkeeping. Only the ChunkStore changes these fields, under its lock.

    A chunk is in one of three states per tier: absent, loading (a Future in `loading`), or present (a raw
    uint8 buffer in `buffers`). `dirty` names the tier holding the newest bytes when other copies (including
    the NVMe file) are stale; `zero` means the contents are all zeros and need no I/O to materialise.
    """

    key: str
    numel: int
    dtype: torch.dtype
    nbytes: int
    buffers: dict[Tier, torch.Tensor] = field(default_factory=dict)
    loading: dict[Tier, Future] = field(default_factory=dict)
    pins: dict[Tier, int] = field(default_factory=dict)
    ready: dict[Tier, object] = field(default_factory=dict)  # transport token of the copy that filled a tier
    on_nvme: bool = False
    zero: bool = True
    dirty: Tier | None = None
    last_use: int = 0
    # loaded ahead of its use, or its use queued (ChunkStore.expect), and not used yet: the last choice for eviction
    prefetched: bool = False
    source: object | None = None  # read-only bytes elsewhere (frozen weights' safetensors): never written
    # small and used every step (LoRA adapters and their state): evicted only when nothing else can be
    keep: bool = False

    def typed(self, tier: Tier) -> torch.Tensor:
        """The resident buffer of `tier` as a flat tensor of the chunk's dtype and length."""
        return self.buffers[tier].view(self.dtype)[: self.numel]

    def pinned(self, tier: Tier) -> bool:
        """Whether someone holds the chunk in `tier` (it must not leave it)."""
        return self.pins.get(tier, 0) > 0

    @property
    def newest_tier(self) -> Tier | None:
        """The tier holding the newest bytes: the dirty one, else any resident copy (all are alike); None if none."""
        if self.dirty is not None:
            return self.dirty
        return next(iter(self.buffers), None)

    def only_copy_in(self, tier: Tier) -> bool:
        """Whether `tier` holds bytes found nowhere else (neither zeros nor on NVMe): dropping them would lose them."""
        return not self.zero and not self.on_nvme and self.newest_tier is tier
