"""Byte budgets per memory tier, and what the machine actually has.

A budget is what the user allows the engine to use, not what it will use: the engine plans within it and
refuses at construction when the model's working set cannot fit. Sizes are read by sizes.py's `parse_size` ("8GB"
is 8 * 2**30 bytes).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .sizes import parse_size

__all__ = ["Budget", "Hardware", "detect_hardware"]

@dataclass
class Budget:
    """How many bytes the engine may hold in each tier.

    On a CPU-only machine `device` and `host` are the same RAM; the engine still keeps them apart (device =
    the blocks being computed on, host = the cache and the optimizer's working set) so the same logic runs
    everywhere, and the two together never exceed what was given here.
    """

    device: int | str | None = None
    """Bytes for blocks being computed on (GPU memory on CUDA). None: 90% of free device memory (on CPU: a
    quarter of available RAM)."""

    host: int | str | None = None
    """Bytes for the host cache and optimizer work (pinned RAM on CUDA). None: half of available RAM."""

    nvme: str | Path | None = None
    """Swap directory for the NVMe tier. None: no NVMe tier, everything must fit in device + host."""

    def __post_init__(self) -> None:
        errors = []
        for field in ("device", "host"):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                setattr(self, field, parse_size(value))
            except ValueError as error:
                errors.append(f"Budget.{field}: {error}")
        if self.nvme is not None:
            self.nvme = Path(self.nvme).expanduser()
        if errors:
            raise ValueError("; ".join(errors))

    def resolved(self, device: torch.device) -> tuple[int, int]:
        """(device bytes, host bytes) with the defaults filled in from the machine."""
        hardware = detect_hardware(device)
        device_bytes = self.device if self.device is not None else int(
            hardware.device_free * 0.9 if device.type == "cuda" else hardware.ram_available // 4
        )
        host_bytes = self.host if self.host is not None else hardware.ram_available // 2
        return int(device_bytes), int(host_bytes)


@dataclass(frozen=True)
class Hardware:
    """What the machine has right now, in bytes."""

    cpu_cores: int
    ram_total: int
    ram_available: int
    device_name: str
    device_total: int
    device_free: int

    def disk_free(self, path: str | Path) -> int:
        """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
        path = Path(path).expanduser().absolute()
        while not path.exists():
            path = path.parent
        return shutil.disk_usage(path).free


def detect_hardware(device: torch.device | str = "cpu") -> Hardware:
    """Read cores, RAM and the compute device's memory (on CPU the device is the RAM)."""
    device = torch.device(device)
    memory = psutil.virtual_memory()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    else:
        free, total, name = memory.available, memory.total, "cpu"
    return Hardware(
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_total=memory.total,
        ram_available=memory.available,
        device_name=name,
        device_total=total,
        device_free=free,
    )
