"""Chunk layouts: where each tensor of a block sits inside the block's flat, 4096-byte-aligned buffers.

The bottom of the package: optimizers need a block's element layout to find each tensor in the flat chunks
they update, and the engine needs it to place tensors in those chunks. Both import it from here, so the
optimizers never depend on the engine.

Every role of a block (compute weights, fp32 master weights, gradients, each optimizer state) shares one element
layout, so element k of the gradient chunk belongs to element k of the weight chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ALIGNMENT", "SLOT_ALIGNMENT", "ChunkLayout", "Slot", "chunk_nbytes", "round_up"]

ALIGNMENT: int = 4096
"""Bytes: O_DIRECT needs buffer addresses, file offsets and lengths that are multiples of the disk's block."""

SLOT_ALIGNMENT = 256
"""Each tensor starts at a multiple of 256 elements, so block-wise quantizers (blocks of 256) never mix two
tensors in one block and a state chunk can be quantized as one independent unit."""


def round_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


def chunk_nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a chunk of `numel` elements of `dtype`, padded for O_DIRECT."""
    return round_up(numel * dtype.itemsize, ALIGNMENT)


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
