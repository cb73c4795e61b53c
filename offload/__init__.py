"""Stream a model's training state through device memory, host memory and NVMe files.

The names below are loaded on first use (PEP 562): `from finetune.offload import parse_size` imports
sizes.py alone, not torch and the engine, so the command line prints its help without them. A new public name is
one entry in `_EXPORTS`, under the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .heap import return_freed_memory_to_os

_EXPORTS: dict[str, tuple[str, ...]] = {
    "activation_choice": ("offload_pays",),
    "activation_mode": ("ActivationMode",),
    "activations": ("ACTIVATION_MEMORY", "ActivationStore"),
    "blocks": ("Block", "BlockPlan", "find_blocks"),
    "budget": ("Budget", "Hardware", "detect_hardware"),
    "checkpoint": ("ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ENGINE_STATE_FILE", "OPTIMIZER_PREFIX", "swap_references"),
    "checksums": ("CHECKSUMS_FILE", "ChecksumMismatch", "checksum_file", "checksum_json", "verify_checksums"),
    "clip_mode": ("ClipMode",),
    "cost_model": ("Machine", "Prediction", "Workload", "predict"),
    "device": ("default_compute_dtype",),
    "durable": ("atomic_directory", "fsync_directory", "fsync_tree", "write_atomic"),
    "engine": ("Engine",),
    "generation": ("freeze_for_generation", "kv_cache_bytes", "without_kv_cache"),
    "heap": ("return_freed_memory_to_os",),
    "host_memory": ("aligned_empty",),
    "locks": ("DirectoryLock", "LockHeld"),
    "merge": ("merge_adapter",),
    "meta_device": ("meta_model",),
    "model_export": ("write_model_config",),
    "nvme": ("ThreadPoolBackend",),
    "rates": ("DiskRates", "disk_bandwidth", "hardware_profile", "measure_machine", "profile_names",
              "refresh_disk_rates"),
    "residency": ("DEFAULT_PREFETCH",),
    "safetensors_io": ("DamagedSafetensors", "UnsupportedDtype", "encode_header", "index_ranges", "plan_shards",
                       "read_header", "safetensors_index", "shard_index", "shard_names", "write_safetensors_shards"),
    "sizes": ("format_bytes", "parse_size"),
    "store": ("BudgetExceeded",),
    "swap_area": ("SwapArea",),
    "tuning": ("Settings", "choose_settings"),
    "vertical": ("vertical_blocker",),
}
"""Module (of this package) -> the public names it defines."""

_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

# At import, before the first large tensor is freed: measured, the same setting made later (when the engine is
# built) leaves the heap to grow as if it were not made. See offload/heap.py.
return_freed_memory_to_os()


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and then kept here (later uses skip this)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
