"""Memory-light optimizers that update one chunk at a time, so their state streams with its block."""

from optim.adamw import AdamW, adamw_update
from optim.base import ChunkOptimizer, StateSpec
from optim.mezo import MeZO, mezo_update

__all__ = ["AdamW", "ChunkOptimizer", "MeZO", "StateSpec", "adamw_update", "mezo_update"]
