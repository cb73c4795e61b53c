"""Chunks: one flat, 4096-byte-aligned buffer per (block, role), the unit of placement and I/O.

PatrickStar's idea: moving one big buffer is cheaper and simpler than moving many small tensors, and a flat
buffer whose address and length are multiples of 4096 can go to disk with O_DIRECT without a bounce copy.
Every role of a block (compute weights, fp32 master weights, gradients, each optimizer state) shares one
element layout, so element k of the gradient chunk belongs to element k of the weight chunk.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from offload.nvme import ALIGNMENT, round_up

__all__ = ["SLOT_ALIGNMENT", "Chunk", "ChunkLayout", "Slot", "Tier", "chunk_nbytes"]

SLOT_ALIGNMENT = 256
"""Each tensor starts at a multiple of 256 elements, so block-wise quantizers (blocks of 256) never mix two
tensors in one block and a state chunk can be quantized as one independent unit."""


def chunk_nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a chunk of `numel` elements of `dtype`, padded for O_DIRECT."""
    return round_up(numel * dtype.itemsize, ALIGNMENT)


class Tier(enum.Enum):
    """Where a chunk's bytes can live, fastest first."""

    DEVICE = "device"
    HOST = "host"
    NVME = "nvme"


@dataclass(frozen=True)
class Slot:
    """Where one tensor sits inside a chunk, in elements."""

    name: str
    shape: torch.Size
    offset: int
    numel: int
    embedding: bool = False  # an nn.Embedding weight (or the head tied to one): some optimizers treat it apart

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into a flat chunk buffer of any dtype."""
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class ChunkLayout:
    """The element layout shared by every role of one block."""

    slots: tuple[Slot, ...]
    numel: int  # padded total, a multiple of SLOT_ALIGNMENT

    @classmethod
    def from_shapes(cls, shapes: dict[str, torch.Size], embeddings: frozenset[str] = frozenset()) -> ChunkLayout:
        slots, offset = [], 0
        for name, shape in shapes.items():
            numel = shape.numel()
            slots.append(Slot(name, torch.Size(shape), offset, numel, name in embeddings))
            offset += round_up(numel, SLOT_ALIGNMENT)
        return cls(tuple(slots), max(offset, SLOT_ALIGNMENT))

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of a chunk of this layout in `dtype`, padded for O_DIRECT."""
        return chunk_nbytes(self.numel, dtype)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [slot.view(flat) for slot in self.slots]


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
    prefetched: bool = False  # loaded ahead of its use and not used yet: the last choice for eviction
    source: object | None = None  # read-only bytes elsewhere (frozen weights' safetensors): never written
    keep: bool = False  # small and used every step (LoRA adapters and their state): evicted only when nothing else can be

    def typed(self, tier: Tier) -> torch.Tensor:
        """The resident buffer of `tier` as a flat tensor of the chunk's dtype and length."""
        return self.buffers[tier].view(self.dtype)[: self.numel]

    def pinned(self, tier: Tier) -> bool:
        return self.pins.get(tier, 0) > 0
