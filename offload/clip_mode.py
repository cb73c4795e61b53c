"""The choice of how gradients are clipped, apart from the clipping itself (clipping.py), so that a command line
can offer it without importing torch."""

from __future__ import annotations

import enum

__all__ = ["ClipMode"]


class ClipMode(str, enum.Enum):
    """How `max_grad_norm` is applied.

    EXACT: the norm of the whole model's gradient, as torch.nn.utils.clip_grad_norm_; every update waits for the
    end of backward (gradient chunks are kept, on NVMe if need be, and read again for the update).
    PER_BLOCK: each block's gradient is clipped to its share of `max_grad_norm` (max_grad_norm * sqrt(block
    numel / model numel)) as soon as the block's backward ends, so updates overlap backward. If every block
    sits at its threshold the global norm is exactly max_grad_norm; a spike in one block is clipped there.
    """

    EXACT = "exact"
    PER_BLOCK = "per-block"
