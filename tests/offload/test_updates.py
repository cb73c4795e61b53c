"""The optimizer worker's queue: updates slower than backward hold the compute thread back, not its gradients."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

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
