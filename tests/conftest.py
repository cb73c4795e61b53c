"""Shared fixtures: tiny models saved to disk and loaded back by path, so the real loading code runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py is a helper module, not a package
# The planner's disk probe writes 1 GiB to measure a rate; the tests need a rate, not a good one (16 MiB: 0.1 s
# instead of ~10 s a probe on the CI VM). Set here, it reaches the `finetune` subprocesses too.
os.environ.setdefault("FINETUNE_DISK_PROBE_BYTES", str(16 * 2**20))


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """finetune's caches (token caches, measured rates) in a temporary directory, not the user's ~/.cache: a test
    that calls `prepare` or the planner in-process must not leave entries there or read a stale one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("finetune-cache")))
        yield
