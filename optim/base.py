"""The chunk-wise optimizer protocol: an optimizer sees one block's chunk at a time.

The engine owns memory and I/O; an optimizer owns only the math. For each block it is handed the block's flat
fp32 master weights, its flat gradient and its state chunks (same element layout as the weights, see
`offload.chunks.ChunkLayout`), so the state streams through the tiers with the block and never needs to be
whole in memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from offload.chunks import ChunkLayout

__all__ = ["ChunkOptimizer"]


class ChunkOptimizer(ABC):
    """Base class of every optimizer the engine can stream.

    `lr` is read at every step, so a learning-rate schedule only has to assign it between steps.
    """

    lr: float

    @abstractmethod
    def state_dtypes(self) -> dict[str, torch.dtype]:
        """The state chunks a block needs, by name; each has the block's layout and starts as zeros."""

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
            state: the chunks named by `state_dtypes`, flat, same shape; updated in place.
            step: 1 for the first update, as in torch.optim.
            layout: where each tensor sits, for optimizers that need per-matrix views (projections).
        """
