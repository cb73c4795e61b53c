"""Whether other processes competed with a rate probe while it ran.

A rate measured beside a test run, a build or another training is a share of the machine's, and every plan built
on the cached number is off by that share for a week: this project's own second scale run cached disk rates of
0.66 / 0.24 GB/s read / write, measured while helpers ran tests, and predicted a LoRA step 24% too long. So each
probe is watched: the CPU time of the whole machine during it, less this process's own (and its children's, the
tiny run's). A probe that shared the machine is kept for an hour only (`BUSY_KEEP_S`) and said so, so the next
plan measures again, at a quieter time with luck. Disk bytes are not watched: the machine's counters sum
partitions with their disks and count compressed swap in RAM (zram), so others' share of a disk is not known
from them; what competes for the disk here (tests, builds, other training) shows in the CPU time as well.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

__all__ = ["BUSY_CPU", "BUSY_KEEP_S", "Contention", "watch"]

BUSY_CPU = 0.25
"""Others' share of all cores' time during a probe above which it counts as shared."""
BUSY_KEEP_S = 3600.0
"""How long a probe that shared the machine is trusted (a quiet one: `rates.CACHE_DAYS`)."""


@dataclass
class Contention:
    """What the rest of the machine did during a probe; filled in when `watch`'s with-block ends."""

    others_cpu: float = 0.0  # share of all cores' time used by other processes

    @property
    def busy(self) -> bool:
        return self.others_cpu > BUSY_CPU


@contextmanager
def watch() -> Iterator[Contention]:
    """`with watch() as seen:` measures `Contention` over the with-block (filled in when it ends)."""
    seen = Contention()
    before = _sample()
    yield seen
    wall, cpu, own = (after - start for after, start in zip(_sample(), before))
    cores = psutil.cpu_count(logical=True) or 1
    seen.others_cpu = max(cpu - own, 0.0) / max(wall * cores, 1e-9)


def _sample() -> tuple[float, float, float]:
    """(wall seconds, the machine's CPU seconds, this process's and its waited-for children's)."""
    machine = psutil.cpu_times()
    own = psutil.Process().cpu_times()
    return (
        time.monotonic(),
        machine.user + machine.system + getattr(machine, "nice", 0.0),
        own.user + own.system + own.children_user + own.children_system,
    )
