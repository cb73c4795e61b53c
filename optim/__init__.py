"""Memory-light optimizers that update one chunk at a time, so their state streams with its block."""

from .adamw import AdamW, adamw_update
from .adamw8bit import AdamW8bit
from .base import ChunkOptimizer, StateSpec
from .frugal import Frugal
from .galore import GaLore
from .mezo import STORAGE_DTYPES, InMemoryMeZO, MeZO, mezo_update
from .rounding import stochastic_round_to_bf16
from .torch_adapter import InMemory, embedding_names

__all__ = [
    "AdamW",
    "AdamW8bit",
    "ChunkOptimizer",
    "Frugal",
    "GaLore",
    "InMemory",
    "InMemoryMeZO",
    "MeZO",
    "STORAGE_DTYPES",
    "StateSpec",
    "adamw_update",
    "embedding_names",
    "mezo_update",
    "stochastic_round_to_bf16",
]
