"""The engine's helper threads (I/O, staging, frozen reads, and on the CPU the optimizer worker) run torch's CPU
operations on one thread each, so the compute thread's OpenMP team keeps the cores to itself.

Every thread that runs a parallel torch operation gets an OpenMP team of its own, whose threads live as long as
it does. Once libgomp manages more threads than the machine has cores, it stops letting any team's threads spin
for their next parallel region (GOMP_SPINCOUNT's rule for an oversubscribed machine): they sleep in the kernel and
each region wakes them, the compute thread's regions too. Measured on the CI VM (2 cores): a 256K-element add on
the compute thread took 16 us alone and 120 us once the optimizer worker had run one operation on two threads; with
the worker on one thread, 16 us. On stream_overhead's model with the activations kept, the engine's step went from
4.41-4.46 s to 4.19-4.28 s (plain PyTorch: 4.11 s), backward's cores busy 1.91 of 2 instead of 1.78.

Only the OpenMP setting of the calling thread changes (`omp_set_num_threads`): `torch.set_num_threads` would also
set the count every thread made later starts from. Where the compute runs on a GPU, the optimizer worker is the
thread doing CPU arithmetic and keeps every core (`single_threaded=False`). Where torch's CPU operations do not run
on OpenMP (no `omp_set_num_threads` in the process), nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["helper_pool", "run_single_threaded"]


def helper_pool(workers: int, name: str, *, single_threaded: bool = True) -> ThreadPoolExecutor:
    """A thread pool whose threads (named `name`_N) run torch's CPU operations on one thread each, unless not
    `single_threaded`."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name,
                              initializer=run_single_threaded if single_threaded else None)


def run_single_threaded() -> bool:
    """From now on, the calling thread's parallel torch operations run on it alone. Returns whether they do."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count at its first use of it: first, so it cannot undo ours
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)
    return torch.get_num_threads() == 1


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """The OpenMP runtime's `omp_set_num_threads` that torch's CPU operations use, looked up among the symbols the
    process has loaded (torch loads its OpenMP runtime into the global scope), or None."""
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):  # no OpenMP, or no global lookup (Windows takes no None)
        return None
