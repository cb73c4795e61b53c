"""The optimizer worker's queue: updates slower than backward hold the compute thread back, not its gradients."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch

from finetune.offload.timers import NO_TIMERS
from finetune.offload.updates import QUEUED, UpdateWorker, queue_depth


def test_at_most_queued_updates_wait_behind_the_running_one(monkeypatch):
    waiting_most = [0]
    started: list[int] = []
    lock = threading.Lock()
    no_chunks = SimpleNamespace(weights=None, master=None, grads=None)
    worker = UpdateWorker([no_chunks] * 8, None, None, None, NO_TIMERS)  # type: ignore[arg-type]

    def slow_update(index, coefficient, step):
        with lock:
            started.append(index)
        time.sleep(0.02)

    monkeypatch.setattr(worker, "_update", slow_update)
    for index in range(8):
        worker.submit(index, step=1)
        with lock:
            waiting_most[0] = max(waiting_most[0], index + 1 - len(started))  # submitted, not started yet
    worker.close()
    assert started == list(range(8))
    assert 1 <= waiting_most[0] <= QUEUED + 1  # the one just submitted may not have started yet


def test_an_update_waits_only_where_the_budgets_hold_its_chunks():
    """queue_depth: one update may wait when the spare bytes beyond the floors hold the largest trained block's
    weights, masters and gradients; none otherwise (its gradients would go to NVMe and back); frozen blocks
    (no gradients) do not count."""
    chunk = SimpleNamespace
    blocks = [SimpleNamespace(weights=chunk(nbytes=100), master=None, grads=chunk(nbytes=100)),
              SimpleNamespace(weights=chunk(nbytes=300), master=chunk(nbytes=600), grads=chunk(nbytes=600)),
              SimpleNamespace(weights=chunk(nbytes=10**6), master=None, grads=None)]
    assert queue_depth(blocks, 1500) == QUEUED == 1
    assert queue_depth(blocks, 1499) == 0


def test_updates_the_worker_has_not_begun_run_on_the_waiting_thread_in_order(monkeypatch):
    """wait: the compute thread takes the queued updates (its OpenMP team has every core, the worker one) and runs
    them after the worker's running one, in submission order, one at a time."""
    ran: list[tuple[int, str, int]] = []
    no_chunks = SimpleNamespace(weights=None, master=None, grads=None)
    worker = UpdateWorker([no_chunks] * 2, None, None, None, NO_TIMERS, single_threaded=True)  # type: ignore[arg-type]
    taken = threading.Event()
    cancel = Future.cancel

    def cancel_and_tell(future: Future) -> bool:
        if cancel(future):
            taken.set()
            return True
        return False

    def update(index, coefficient, step):
        if index == 0:  # the worker's running update: it ends only once wait has taken the queued one
            taken.wait(30)
        ran.append((index, threading.current_thread().name, torch.get_num_threads()))

    monkeypatch.setattr(Future, "cancel", cancel_and_tell)
    monkeypatch.setattr(worker, "_update", update)
    worker.submit(0, step=1)
    worker.submit(1, step=1)
    worker.wait()
    worker.close()
    assert [(index, name.startswith("optimizer")) for index, name, _ in ran] == [(0, True), (1, False)]
    assert [threads for _, _, threads in ran] == [1, torch.get_num_threads()]


def test_a_failed_update_is_raised_by_wait_after_the_others_ran(monkeypatch):
    ran: list[int] = []
    no_chunks = SimpleNamespace(weights=None, master=None, grads=None)
    worker = UpdateWorker([no_chunks] * 3, None, None, None, NO_TIMERS)  # type: ignore[arg-type]

    def update(index, coefficient, step):
        ran.append(index)
        if index == 0:
            raise OSError("disk full")

    monkeypatch.setattr(worker, "_update", update)
    for index in range(3):
        worker.submit(index, step=1)
    with pytest.raises(OSError, match="disk full"):
        worker.wait()
    worker.close()
    assert sorted(ran) == [0, 1, 2]
