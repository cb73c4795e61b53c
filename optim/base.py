"""The chunk-wise optimizer protocol: an optimizer sees one block's chunk at a time.

The engine owns memory and I/O; an optimizer owns only the math. For each block it is handed the block's flat
fp32 master weights, its flat gradient and its state chunks, so the state streams through the tiers with the
block and never needs to be whole in memory. The optimizer decides how big each state chunk is
(`state_specs`): fp32 Adam moments share the weights' element layout, an 8-bit moment needs one byte per element
plus a scale per 256, a low-rank projection needs rank-sized buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .layout import ChunkLayout

__all__ = ["ChunkOptimizer", "StateSpec"]


@dataclass(frozen=True)
class StateSpec:
    """One state chunk of a block: `numel` elements of `dtype`, zeros before the first step."""

    numel: int
    dtype: torch.dtype


class ChunkOptimizer(ABC):
    """Base class of every optimizer the engine can stream.

    `lr` is read at every step, so a learning-rate schedule only has to assign it between steps.
    """

    lr: float

    @abstractmethod
    def state_specs(self, layout: ChunkLayout) -> dict[str, StateSpec]:
        """The state chunks one block with this layout needs, by name."""

    @abstractmethod
    def step(
        self,
        params: torch.Tensor,
        grads: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        step: int,
        layout: ChunkLayout,
    ) -> None:
        """Update one block in place.

        Args:
            params: flat fp32 master weights of the block, shape (layout.numel,); updated in place.
            grads: flat fp32 gradient, same shape; already clipped and averaged over micro-batches.
            state: the chunks named by `state_specs`, flat, each of its spec's numel and dtype; updated in place.
            step: 1 for the first update, as in torch.optim.
            layout: where each tensor sits (`Slot.view`), for optimizers that need per-matrix views.
        """

    def state_dict(self) -> dict[str, Any]:
        """State that lives outside the chunks (random generators, schedules of projections), for checkpoints.

        Hyperparameters are not included: a resumed run is configured again by its caller.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state outside its chunks, got keys {sorted(state)}")
