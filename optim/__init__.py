"""Memory-light optimizers that update one chunk at a time, so their state streams with its block."""

from optim.adamw import AdamW, adamw_update
from optim.adamw8bit import AdamW8bit
from optim.base import ChunkOptimizer, StateSpec
from optim.frugal import Frugal
from optim.galore import GaLore
from optim.mezo import InMemoryMeZO, MeZO, mezo_update
from optim.torch_adapter import InMemory, embedding_names

__all__ = [
    "AdamW",
    "AdamW8bit",
    "ChunkOptimizer",
    "Frugal",
    "GaLore",
    "InMemory",
    "InMemoryMeZO",
    "MeZO",
    "StateSpec",
    "adamw_update",
    "embedding_names",
    "mezo_update",
]
