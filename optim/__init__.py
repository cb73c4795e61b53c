"""Memory-light optimizers that update one chunk at a time, so their state streams with its block."""

from optim.adamw import AdamW, adamw_update
from optim.base import ChunkOptimizer

__all__ = ["AdamW", "ChunkOptimizer", "adamw_update"]
