"""What the machine gives a run, as the engine sees it: memory budgets, a swap directory, disk speed.

`finetune run` checks --memory / --device-memory / --host-memory against the engine's minimum for the model,
and --nvme with a real file, before anything is written. `finetune info --bandwidth` measures a disk through
the engine's own NVMe backend (O_DIRECT where the filesystem allows it), so the number is what swapping will
get, not what the page cache makes a disk look like.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..offload import Budget, DiskRates, format_bytes, parse_size, refresh_disk_rates
from .config import flag
from .errors import FinetuneError

__all__ = ["BudgetOptions", "disk_bandwidth", "run_budget"]


class BudgetOptions(Protocol):
    """The memory flags of a command (`run`'s RunConfig, `generate`'s and `chat`'s options)."""

    memory: str | None
    device_memory: str | None
    host_memory: str | None
    nvme: str | None


def run_budget(config: BudgetOptions, need_device: int, need_host: int) -> Budget:
    """The tier budgets of `config`, checked against the engine's minimum (`need_device`, `need_host` bytes).

    --memory alone gives each tier its minimum and splits the rest evenly, so any --memory above the sum of
    the minimums works (on CPU the plan then re-splits it as it predicts fastest: cli/plan.py). Without any of
    them the engine takes its budgets from the machine.

    Raises:
        FinetuneError: a size that is not one, a budget below the minimum (the message gives the minimum), or an
            --nvme that cannot be written.
    """
    memory, device, host = (_size(config, name) for name in ("memory", "device_memory", "host_memory"))
    if memory is not None:
        if memory < need_device + need_host:
            raise FinetuneError(
                f"--memory {config.memory} is below the minimum {format_bytes(need_device + need_host)} for this model "
                f"(device {format_bytes(need_device)} + host {format_bytes(need_host)}); raise --memory to at least "
                f"{format_bytes(need_device + need_host)}"
            )
        if device is None and host is None:
            device = need_device + (memory - need_device - need_host) // 2
        device, host = (device, memory - device) if host is None else (memory - host, host)
    for name, value, need in (("device_memory", device, need_device), ("host_memory", host, need_host)):
        if value is not None and value < need:
            raise FinetuneError(
                f"{flag(name)} {format_bytes(value)} is below the minimum {format_bytes(need)} for this model; raise "
                f"{flag(name)} to at least {format_bytes(need)}"
            )
    if config.nvme:
        _check_writable(Path(config.nvme))
    return Budget(device=device, host=host, nvme=config.nvme)


def _size(config: BudgetOptions, name: str) -> int | None:
    """The bytes of a memory flag, or None when not given. `run` has checked its sizes already (RunConfig); a
    command that has not gets the same words here rather than parse_size's."""
    value = getattr(config, name)
    try:
        return parse_size(value) if value is not None else None
    except ValueError:
        raise FinetuneError(f"{flag(name)} {value!r} is not a size; use e.g. 512MB or 8GB") from None


def _check_writable(directory: Path) -> None:
    """Probe with a real file: os.access says yes to root on a read-only mount."""
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        if created:
            directory.rmdir()  # the engine creates (and later removes) it
    except OSError as error:
        raise FinetuneError(
            f"--nvme {directory} is not a writable directory ({error.strerror}); pass a directory on a disk you "
            "can write"
        ) from None


def disk_bandwidth(directory: Path, nbytes: int, progress: Callable[[str], None] | None = None) -> DiskRates:
    """The disk's rates at `directory` (write, read, and how much of its time compute hides), measured now; the
    planner's cache keeps them (`offload.refresh_disk_rates`), so `finetune info --bandwidth` refreshes what `plan`
    and `run` use.

    Raises:
        FinetuneError: the directory cannot be written.
    """
    try:
        return refresh_disk_rates(directory, nbytes, progress)
    except OSError as error:
        raise FinetuneError(
            f"cannot measure the disk at {directory} ({error.strerror}); pass a writable --path"
        ) from None
