"""glibc's heap, tuned at `import finetune.offload`: threads allocating at once share MALLOC_ARENAS arenas.

Reference: glibc's own report (`malloc_stats`, one "Arena N:" line each) of a process whose 8 threads allocate
torch tensors at once (torch releases the GIL, so they contend): 9 arenas on the CI machine without the import.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from finetune.offload.heap import MALLOC_ARENAS

THREADS = """
import ctypes, sys, threading
import torch
if sys.argv[1] == "tuned":
    import finetune.offload
def work():
    for _ in range(200):
        kept = [torch.ones(20_000) * 2 for _ in range(10)]
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str) -> int:
    report = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, check=True).stderr
    return sum(line.startswith("Arena ") for line in report.splitlines())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_threads_share_at_most_malloc_arenas():
    assert _arenas("tuned") <= MALLOC_ARENAS
    assert _arenas("plain") > MALLOC_ARENAS  # the test can tell: without the import, the threads spread out
