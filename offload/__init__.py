"""Stream a model's training state through device memory, host memory and NVMe files."""

from .blocks import Block, BlockPlan, find_blocks
from .budget import Budget, Hardware, detect_hardware, format_bytes, parse_size
from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENGINE_STATE_FILE, OPTIMIZER_PREFIX, swap_references
from .checksums import CHECKSUMS_FILE, ChecksumMismatch, checksum_file, checksum_json, verify_checksums
from .cost_model import Machine, Prediction, Workload, predict
from .device import default_compute_dtype
from .durable import atomic_directory, fsync_tree, write_atomic
from .engine import ClipMode, Engine
from .host_memory import aligned_empty, return_freed_memory_to_os
from .locks import DirectoryLock, LockHeld
from .merge import merge_adapter
from .meta_model import meta_model
from .model_export import write_model_config
from .nvme import ThreadPoolBackend
from .rates import DiskRates, disk_bandwidth, hardware_profile, measure_machine, profile_names, refresh_disk_rates
from .residency import DEFAULT_PREFETCH
from .safetensors_io import (
    DamagedSafetensors,
    UnsupportedDtype,
    encode_header,
    index_ranges,
    plan_shards,
    read_header,
    safetensors_index,
    shard_index,
    shard_names,
    write_safetensors_shards,
)
from .store import BudgetExceeded
from .swap_area import SwapArea
from .tuning import Settings, choose_settings

# At import, before the first large tensor is freed: measured, the same setting made later (when the engine is
# built) leaves the heap to grow as if it were not made. See offload/host_memory.py.
return_freed_memory_to_os()

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKSUMS_FILE",
    "ChecksumMismatch",
    "DEFAULT_PREFETCH",
    "ENGINE_STATE_FILE",
    "OPTIMIZER_PREFIX",
    "Block",
    "BlockPlan",
    "Budget",
    "DamagedSafetensors",
    "BudgetExceeded",
    "ClipMode",
    "DirectoryLock",
    "Engine",
    "Hardware",
    "LockHeld",
    "Machine",
    "Prediction",
    "Settings",
    "SwapArea",
    "UnsupportedDtype",
    "Workload",
    "ThreadPoolBackend",
    "aligned_empty",
    "atomic_directory",
    "checksum_file",
    "checksum_json",
    "choose_settings",
    "default_compute_dtype",
    "detect_hardware",
    "DiskRates",
    "disk_bandwidth",
    "encode_header",
    "find_blocks",
    "format_bytes",
    "hardware_profile",
    "measure_machine",
    "fsync_tree",
    "index_ranges",
    "merge_adapter",
    "meta_model",
    "parse_size",
    "plan_shards",
    "predict",
    "profile_names",
    "read_header",
    "refresh_disk_rates",
    "safetensors_index",
    "shard_index",
    "shard_names",
    "swap_references",
    "verify_checksums",
    "write_atomic",
    "write_model_config",
    "write_safetensors_shards",
]
