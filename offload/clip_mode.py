"""The choice of how gradients are clipped, apart from the clipping itself (clipping.py), so that a command line
can offer it without importing torch."""

from __future__ import annotations

import enum

__all__ = ["ClipMode"]


class ClipMode(str, enum.Enum):
    """How `max_grad_norm` is applied.

    EXACT: the norm of the whole model's gradient, as torch.nn.utils.clip_grad_norm_. With a swap directory each
    update still runs inside backward, as if no clipping were needed, keeping what it overwrites (as swap file
    versions) and its gradient; once the norm is known the step is kept (coefficient 1.0), or rolled back and redone
    clipped, or (norm not finite) rolled back and skipped. Without one every update waits for the end of backward
    (gradient chunks are kept and read again for the update).
    PER_BLOCK: each block's gradient is clipped to its share of `max_grad_norm` (max_grad_norm * sqrt(block
    numel / model numel)) as soon as the block's backward ends, so updates overlap backward. If every block
    sits at its threshold the global norm is exactly max_grad_norm; a spike in one block is clipped there.
    """

    EXACT = "exact"
    PER_BLOCK = "per-block"
