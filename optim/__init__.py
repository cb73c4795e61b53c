"""Memory-light optimizers that update one chunk at a time, so their state streams with its block."""

from optim.adamw import AdamW, adamw_update
from optim.base import ChunkOptimizer, StateSpec

__all__ = ["AdamW", "ChunkOptimizer", "StateSpec", "adamw_update"]
