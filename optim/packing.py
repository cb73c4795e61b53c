"""Where each tensor's optimizer state sits inside one of a block's state chunks.

A state chunk holds the state of all the tensors of a block, one after another. That state need not have the
tensor's own size (an 8-bit moment is one byte per element, a GaLore moment is rank x the larger dimension, a
projector is rank x the smaller one), so an optimizer lays out its own regions with `pack`. Every region starts
at a multiple of 256 elements, as tensors do in the weight chunk, so a block-wise quantizer (blocks of 256) never
mixes two tensors in one block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .layout import SLOT_ALIGNMENT, round_up

__all__ = ["Region", "pack"]


@dataclass(frozen=True)
class Region:
    """`shape` elements starting at element `offset` of a flat state chunk."""

    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This region of `flat` (any dtype) as a tensor of `shape`, sharing memory."""
        return flat[self.offset : self.offset + self.numel].view(self.shape)


def pack(shapes: Iterable[tuple[int, ...]]) -> tuple[list[Region], int]:
    """Regions for `shapes` one after another, each at a multiple of SLOT_ALIGNMENT, and their padded total.

    An empty shape (a rank-0 projector) takes no room.
    """
    regions, offset = [], 0
    for shape in shapes:
        region = Region(offset, tuple(shape))
        regions.append(region)
        offset += round_up(region.numel, SLOT_ALIGNMENT)
    return regions, offset
