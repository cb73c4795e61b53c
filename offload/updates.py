"""The optimizer worker: one thread that applies each block's optimizer step in host memory (Fuyou's overlap).

Note [The worker owns a block's chunks]: from `submit` until the update finishes, the block's weights, masters,
gradients and states belong to the worker thread: the compute thread does not touch them (the block's backward is
over, and its next use is the next step's forward, which starts only after `wait`). The store's lock orders the
two threads' acquires and releases; nothing else is shared but `BlockState.norms` (see block_state.py) and the
versions a speculative update keeps (below).

Note [Speculative updates]: under exact clipping (with a swap directory) each block's update runs in backward as
if no clipping were needed, SuperOffload's speculation: before it changes a chunk the worker keeps the chunk's
present bytes as a version of its swap file (`ChunkStore.keep_version`; bytes only in memory are written there
first); the gradient is consumed as without clipping (only its per-tensor norms stay). Once backward is over the
global norm decides (first_order.py `finish_updates`): a coefficient of exactly 1.0 commits (`commit`: the kept
versions are dropped; clip_grad_norm_ multiplies by 1.0, and x * 1.0 == x, so this is exact); anything else rolls
every block back (`roll_back`: each chunk's kept version becomes its contents again) and the step runs again from
its RNG state, its updates in backward with the coefficient: the gradients are made again, bit for bit, rather
than kept (keeping them wrote them to swap under the budget, 0.9 GiB a step on memory_bound's model, for the steps
that needed no clipping). A norm that is not finite rolls back and skips the step. The kept versions are written
by the worker inside the update and read by the compute thread only after `wait`, whose `Future.result` orders
the two.
"""

from __future__ import annotations

import time
from concurrent import futures
from concurrent.futures import Future

import torch

from ..optim.base import ChunkOptimizer
from .block_state import BlockState
from .chunk_files import VersionRef
from .chunks import Chunk, Tier
from .clipping import Clipping
from .helper_threads import helper_pool
from .store import ChunkStore
from .timers import Timers

__all__ = ["QUEUED", "UpdateWorker"]


_Update = tuple[int, "torch.Tensor | None", int]
"""A submitted update's arguments: block index, clipping coefficient, optimizer step (`UpdateWorker._update`)."""

QUEUED = 1
"""Updates that may wait behind the running one at the most (see `UpdateWorker.submit` and `queue_depth`)."""


def queue_depth(blocks: list[BlockState], spare: int) -> int:
    """How many updates may wait behind the running one: QUEUED when the budgets have `spare` bytes beyond their
    floors for one more block's weights, masters and gradients, else none. A waiting update's chunks need that
    room: without it (a 7B model at 4 GB, where the device holds the block in backward and the host the running
    update) its gradients go to NVMe and back, 3 GiB a step on 4 layers; with it the compute thread need not stop
    for every update (10% of a small LoRA step)."""
    waiting = max((sum(c.nbytes for c in (s.weights, s.master, s.grads) if c is not None) for s in blocks
                   if s.grads is not None), default=0)
    return QUEUED if spare >= waiting else 0


class UpdateWorker:
    """Runs block updates on its thread, in submission order."""

    def __init__(
        self, blocks: list[BlockState], store: ChunkStore, optimizer: ChunkOptimizer, clipping: Clipping,
        timers: Timers, *, release_spilled_grads: bool = False, queued: int = QUEUED, single_threaded: bool = False,
    ) -> None:
        """`single_threaded`: the worker's arithmetic runs on one core, leaving the others to the compute thread
        (where that runs on the CPU: helper_threads.py)."""
        self.blocks, self.store, self.optimizer, self.clipping = blocks, store, optimizer, clipping
        self.timers = timers
        # Gradients consumed inside backward get no swap room (floors.check_budget): one that spilled while it
        # waited for its update gives its file's space back once used.
        self.release_spilled_grads = release_spilled_grads
        self.queued = queued  # at most this many updates wait behind the running one (`queue_depth`)
        self._pool = helper_pool(1, "optimizer", single_threaded=single_threaded)
        self._pending: list[tuple[Future, _Update]] = []  # compute thread only: each update's future and arguments
        # Note [Speculative updates]: block index -> (chunk, its kept version) of each chunk its update wrote.
        self._kept: dict[int, list[tuple[Chunk, VersionRef]]] = {}

    def submit(self, index: int, step: int, coefficient: torch.Tensor | None = None) -> None:
        """Start block `index`'s update for optimizer step `step`: Note [The worker owns a block's chunks].
        `coefficient`: the global clipping coefficient (exact clipping), else the block's own is used.

        At most `queued` updates wait behind the running one: when updates are slower than backward (the disk
        serves their states), gradient chunks would otherwise pile up waiting and spill to swap files, which the
        disk check counts only QUEUED + 1 of (floors.check_budget). The compute thread waits here instead; it
        holds no chunk the worker needs (the block it just released, nothing else). The block's chunks are marked
        as expected (`ChunkStore.expect`) so that nothing evicts them before the worker acquires them."""
        start = time.perf_counter()
        while sum(not future.done() for future, _ in self._pending) > self.queued:
            futures.wait([f for f, _ in self._pending if not f.done()], return_when=futures.FIRST_COMPLETED)
        self.timers.add("wait for updates", time.perf_counter() - start)
        state = self.blocks[index]
        for chunk in (state.weights, state.master, state.grads):
            if chunk is not None:
                self.store.expect(chunk)
        update = (index, coefficient, step)
        self._pending.append((self._pool.submit(self._update, *update), update))

    def wait(self) -> None:
        """Block until every submitted update is done; re-raises the first failure. Hands the chunks back.

        The updates the worker has not begun run here, on the compute thread, once the worker's running one ends:
        nothing is left for them to overlap with, and on the CPU the compute thread's OpenMP team has every core
        where the worker has one (helper_threads.py): the tied embedding's update at the end of stream_overhead's
        step took 0.15 s there. One update still runs at a time, as the budget's floors count."""
        start = time.perf_counter()
        pending, self._pending = self._pending, []
        taken: list[_Update] = []
        # The worker begins updates in submission order, so those it has not begun are the newest: cancelled newest
        # first, each `cancel` either takes an update from the worker for good or finds it begun (and every older).
        for future, update in reversed(pending):
            if not future.cancel():
                break
            taken.append(update)
        errors = [future.exception() for future, _ in pending[: len(pending) - len(taken)]]  # waits for each
        for update in reversed(taken):
            try:
                self._update(*update)
            except Exception as error:  # the first failure is raised below, once all have ended
                errors.append(error)
        self.timers.add("wait for updates", time.perf_counter() - start)
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    def abandon(self) -> None:
        """A step failed (a full disk while backward evicted a chunk): let its submitted updates end, dropping their
        own failures (often the same full disk), so the step's error is the one raised, not one from `close`."""
        pending, self._pending = self._pending, []
        futures.wait([future for future, _ in pending])
        self.commit()  # its speculative updates stay as they ran (the run resumes from a checkpoint): no pin is left
        # for the next step's rollback to restore

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------ Note [Speculative updates], compute thread, after wait

    def commit(self) -> None:
        """The speculative updates stand: forget the versions they kept, and the gradient norms."""
        kept, self._kept = self._kept, {}
        self.store.drop([ref[0] for chunks in kept.values() for _, ref in chunks if ref is not None])
        for index in kept:
            self.blocks[index].norms = None

    def roll_back(self) -> None:
        """Undo every speculative update: each chunk it wrote gets its kept bytes back, bit for bit."""
        kept, self._kept = self._kept, {}
        for index, chunks in kept.items():
            for chunk, ref in chunks:
                self.store.restore_version(chunk, ref)
            self.blocks[index].norms = None

    def discard_grads(self) -> None:
        """A skipped step: every trainable block's gradient is dropped unused (the next step starts from zeros)."""
        for state in self.blocks:
            if state.grads is not None and state.trainable:
                self._discard_grads(state)
            state.norms = None

    def _discard_grads(self, state: BlockState) -> None:
        # Used up: the next step starts from zeros without reading anything.
        self.store.discard(state.grads, release_file=self.release_spilled_grads)

    def _update(self, index: int, coefficient: torch.Tensor | None, step: int) -> None:
        """One block's optimizer step, on the worker thread, in host memory."""
        start = time.perf_counter()
        state = self.blocks[index]
        if coefficient is None:
            coefficient = self.clipping.block_coefficient(state)
        weights = self.store.acquire(state.weights, Tier.HOST)
        master = self.store.acquire(state.master, Tier.HOST) if state.master is not None else weights
        grads = self.store.acquire(state.grads, Tier.HOST)
        optimizer_states = {name: self.store.acquire(chunk, Tier.HOST) for name, chunk in state.states.items()}
        speculative = coefficient is None and self.clipping.speculative
        if speculative:  # Note [Speculative updates]: keep what the update overwrites, before it does
            written = [state.weights, *([state.master] if state.master is not None else []), *state.states.values()]
            self._kept[index] = [(chunk, self.store.keep_version(chunk)) for chunk in written]
        grads = grads if grads.dtype == torch.float32 else grads.float()
        if coefficient is not None:
            grads.mul_(coefficient)
        math_start = time.perf_counter()
        self.optimizer.step(master, grads, optimizer_states, step=step, layout=state.layout)
        self.timers.add("optimizer math", time.perf_counter() - math_start)
        if state.master is not None:
            weights.copy_(master)
            self.store.release(state.master, Tier.HOST, dirty=True)
        self.store.release(state.weights, Tier.HOST, dirty=True)
        for chunk in state.states.values():
            self.store.release(chunk, Tier.HOST, dirty=True)
        self.store.release(state.grads, Tier.HOST)
        self._discard_grads(state)
        if not speculative:  # a speculative update's norms wait for the step's validation
            state.norms = None
        self.timers.add("update", time.perf_counter() - start)
