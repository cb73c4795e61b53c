"""Stream a model's training state through device memory, host memory and NVMe files."""

from .blocks import Block, BlockPlan, find_blocks
from .budget import Budget, Hardware, detect_hardware, format_bytes, parse_size
from .device import default_compute_dtype
from .engine import ClipMode, Engine
from .host_memory import return_freed_memory_to_os
from .merge import merge_adapter
from .meta_model import meta_model
from .nvme import ThreadPoolBackend, aligned_empty
from .store import BudgetExceeded

# At import, before the first large tensor is freed: measured, the same setting made later (when the engine is
# built) leaves the heap to grow as if it were not made. See offload/host_memory.py.
return_freed_memory_to_os()

__all__ = [
    "Block",
    "BlockPlan",
    "Budget",
    "BudgetExceeded",
    "ClipMode",
    "Engine",
    "Hardware",
    "ThreadPoolBackend",
    "aligned_empty",
    "default_compute_dtype",
    "detect_hardware",
    "find_blocks",
    "format_bytes",
    "merge_adapter",
    "meta_model",
    "parse_size",
]
