"""Stream a model's training state through device memory, host memory and NVMe files."""

from offload.blocks import Block, BlockPlan, find_blocks
from offload.budget import Budget, Hardware, detect_hardware, format_bytes, parse_size
from offload.engine import ClipMode, Engine
from offload.store import BudgetExceeded

__all__ = [
    "Block",
    "BlockPlan",
    "Budget",
    "BudgetExceeded",
    "ClipMode",
    "Engine",
    "Hardware",
    "detect_hardware",
    "find_blocks",
    "format_bytes",
    "parse_size",
]
