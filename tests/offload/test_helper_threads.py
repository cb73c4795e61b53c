"""The engine's helper threads run torch's CPU operations on one thread each, and nothing else changes."""

from __future__ import annotations

import threading

import pytest
import torch

from finetune.offload.helper_threads import helper_pool, run_single_threaded

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs on one thread here already")


def _threads_of_a_new_thread() -> int:
    counts: list[int] = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


def test_a_helper_thread_runs_single_threaded_and_leaves_the_others_alone():
    main = torch.get_num_threads()
    later = _threads_of_a_new_thread()
    with helper_pool(1, "test-helper") as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        assert pool.submit(run_single_threaded).result() is True
        pool.submit(lambda: torch.ones(1 << 20).add_(1)).result()  # a parallel-sized operation, on the helper
    assert torch.get_num_threads() == main  # torch.set_num_threads would have changed these two
    assert _threads_of_a_new_thread() == later


def test_a_pool_not_single_threaded_keeps_torch_s_count():
    with helper_pool(1, "test-helper", single_threaded=False) as pool:
        assert pool.submit(torch.get_num_threads).result() == _threads_of_a_new_thread() > 1
