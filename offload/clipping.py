"""Gradient clipping over a model whose gradients are never all in memory at once.

Each block's per-tensor gradient norms are taken when its gradient is final (the data is hot then); the global
norm is the norm of all of them, stacked in `model.parameters()` order as `torch.nn.utils.clip_grad_norm_` does,
so EXACT clipping equals it to the bit.

EXACT clipping with a swap directory speculates (`Clipping.speculative`): every update runs in backward as if no
clipping were needed, and is rolled back and redone when the global norm says otherwise (updates.py, Note
[Speculative updates]). Without a swap directory there is nowhere to keep the bytes to roll back to, and the
updates wait for the end of backward instead.
"""

from __future__ import annotations

import torch

from .block_state import BlockState
from .clip_mode import ClipMode

__all__ = ["Clipping", "updates_in_backward"]


def updates_in_backward(max_grad_norm: float | None, mode: ClipMode) -> bool:
    """Whether a block's update may start as soon as its backward ends (else after the whole backward): no clipping,
    or PER_BLOCK. Then, without accumulation, a gradient chunk lives only from its block's backward to its update."""
    return max_grad_norm is None or mode is ClipMode.PER_BLOCK


class Clipping:
    """The clipping of one engine: `max_grad_norm` None means no clipping."""

    def __init__(
        self, max_grad_norm: float | None, mode: ClipMode, blocks: list[BlockState], *, speculative: bool = False
    ) -> None:
        """`speculative`: EXACT updates run in backward and are validated after it (needs a swap directory)."""
        self.max_grad_norm, self.mode = max_grad_norm, mode
        self.speculative = speculative and max_grad_norm is not None and mode is ClipMode.EXACT
        # Layout sizes, not Block.numel: parameters of blocks not resident have empty placeholders.
        self._total_numel = sum(slot.numel for b in blocks for slot in b.layout.slots)

    @property
    def updates_in_backward(self) -> bool:
        """Whether a block's update may start as soon as its backward ends (else after the whole backward)."""
        return self.speculative or updates_in_backward(self.max_grad_norm, self.mode)

    def finish_block(self, state: BlockState) -> None:
        """The block's gradient is final (its parameters' .grad view the held gradient chunk): keep the
        per-tensor norms. Compute thread, before the block's update is submitted."""
        if self.max_grad_norm is not None:
            state.norms = [torch.linalg.vector_norm(p.grad, 2) for p in state.params]

    def global_norm(self, blocks: list[BlockState]) -> torch.Tensor:
        """The whole model's gradient norm, as clip_grad_norm_ returns it. After the whole backward."""
        # model.parameters() order, as torch stacks them
        norms = [norm for state in blocks for norm in state.norms or []]
        return torch.linalg.vector_norm(torch.stack(norms), 2)

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        """clip_grad_norm_'s coefficient for the global norm `total` (it multiplies by it even when it is 1.0)."""
        assert self.max_grad_norm is not None
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def block_coefficient(self, state: BlockState) -> torch.Tensor | None:
        """PER_BLOCK: the block's own coefficient (on the worker, from the norms the compute thread kept)."""
        if self.max_grad_norm is None or self.mode is ClipMode.EXACT:
            return None
        block_numel = sum(slot.numel for slot in state.layout.slots)
        threshold = self.max_grad_norm * (block_numel / self._total_numel) ** 0.5
        norm = torch.linalg.vector_norm(torch.stack(state.norms), 2)
        return torch.clamp(threshold / (norm + 1e-6), max=1.0)
