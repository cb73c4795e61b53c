"""ChunkStore: where every chunk lives, and the only code that moves chunk bytes.

Rules it keeps:
- A tier's bytes in use never exceed its budget. Making room evicts the least recently used chunk that
  nobody holds (device -> host -> NVMe), or waits for a write in flight to finish. A chunk prefetched and not
  used yet goes last (the one needed latest first): evicting it would only read it again.
- Prefetches are asked for in the order of use, and the staging thread may run them late (under load), so a
  prefetch loads nothing that would have to be read twice: it evicts no chunk prefetched and not used yet (that
  one is needed sooner), and it is dropped when it comes too late (`prefetch_order.PrefetchOrder`).
- A chunk is never dropped from the last tier holding its newest bytes: a dirty host chunk is written to its
  NVMe file first, and its memory is counted until that write completes.
- Loads and writes are asynchronous (the NVMe backend's threads); `prefetch` loads on a staging thread, so the
  compute thread never waits for eviction work it did not need. Freed host buffers are kept for the next chunk
  of their size (`buffer_pool.BufferPool`), counted against the budget. All bookkeeping happens under one lock
  (a Condition); I/O and copies happen outside it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import torch

from .buffer_pool import BufferPool
from .chunk_files import ChunkFiles, VersionRef
from .chunks import Chunk, Tier
from .device import Transport
from .eviction import BudgetExceeded, choose_victim, may_free_later, no_room
from .helper_threads import helper_pool
from .prefetch_order import PrefetchOrder, Ticket
from .swap import SwapBackend, completed, write_failed

__all__ = ["BudgetExceeded", "ChunkStore"]


class ChunkStore:
    """Holds chunks in the device and host tiers within their budgets, spilling to NVMe files."""

    def __init__(
        self,
        device_bytes: int,
        host_bytes: int,
        transport: Transport,
        backend: SwapBackend | None,
        *,
        wait_limit_s: float = 60.0,
        stager: Executor | None = None,
        verify_reads: bool = False,
    ) -> None:
        """`backend`: where chunks spill (None: nowhere, so dirty host chunks stay in memory).
        `wait_limit_s`: a demand load that waits this long for other threads to release memory is taken for a
        deadlock (everything held) and raises BudgetExceeded instead of hanging.
        `stager`: the one-thread executor prefetches run on, in order (default: a new one; tests pass their own).
        `verify_reads`: check every swap read against a checksum of what was written (`ChunkFiles`)."""
        self.wait_limit_s = wait_limit_s
        self.limits = {Tier.DEVICE: device_bytes, Tier.HOST: host_bytes}
        self.used = {Tier.DEVICE: 0, Tier.HOST: 0}
        self._pool = BufferPool((Tier.DEVICE, Tier.HOST) if transport.shares_memory else (Tier.HOST,))
        self.peak = {Tier.DEVICE: 0, Tier.HOST: 0}
        self.bytes_read = 0
        self.bytes_written = 0
        self.transport = transport
        self.backend = backend
        self._chunks: list[Chunk] = []
        self._files = ChunkFiles(backend, verify=verify_reads)
        self._writing: dict[int, Future] = {}  # id(chunk) -> write in flight
        self._moving: set[int] = set()  # id(chunk) of chunks being re-charged from one tier to another
        self._lock = threading.Condition()
        self._clock = 0
        self._order = PrefetchOrder()
        self._write_error: BaseException | None = None  # a failed swap write, raised to the next demand
        self._stager = stager or helper_pool(1, "chunk-stage")

    # ----------------------------------------------------------------------------------------- public API

    def create(
        self, key: str, numel: int, dtype: torch.dtype, nbytes: int, *, source: object | None = None, keep: bool = False
    ) -> Chunk:
        """Register a chunk whose contents start as zeros (materialised only when first acquired).

        `source`: instead, the chunk is read-only and its bytes come from `source.read_into(buffer) -> Future`
        (frozen weights in a model's safetensors). It is never written anywhere: evicting it drops it.
        `keep`: evict it only when no other chunk can make room, so chunks used every step and small beside the
        budget (LoRA adapters) stay in memory instead of cycling through NVMe with the blocks around them."""
        chunk = Chunk(key=key, numel=numel, dtype=dtype, nbytes=nbytes, source=source, keep=keep)
        if source is not None:
            chunk.zero, chunk.on_nvme = False, True  # a clean copy exists below memory: the source
        with self._lock:
            self._chunks.append(chunk)
        return chunk

    def acquire(self, chunk: Chunk, tier: Tier) -> torch.Tensor:
        """Make `chunk` resident in `tier`, hold it there, and return it as a flat typed tensor.

        Blocks until the bytes are there. Every acquire is paired with one `release`.
        """
        with self._lock:
            chunk.pins[tier] = chunk.pins.get(tier, 0) + 1  # held from now on: never chosen for eviction
            self._order.acquired(chunk, tier)
        try:
            token = self._ensure(chunk, tier, best_effort=False).result()
            with self._lock:  # a read's future resolves before its done-callback has published the buffer
                while tier not in chunk.buffers:
                    self._lock.wait(timeout=1.0)
                chunk.prefetched = False
        except BaseException:
            self.release(chunk, tier)
            raise
        if tier is Tier.DEVICE:
            self.transport.ready(token)
        else:
            self.transport.ready_on_host(token)
        return chunk.typed(tier)

    def prefetch(self, chunk: Chunk, tier: Tier) -> None:
        """Start making `chunk` resident in `tier` without holding it; skipped if there is no room."""
        if tier in chunk.buffers or tier in chunk.loading:
            return
        with self._lock:
            ticket = self._order.ask()
        self._stager.submit(self._prefetch, chunk, tier, ticket)

    def expect(self, chunk: Chunk) -> None:
        """Say that `chunk`'s next use is already queued (an update waiting for the optimizer thread): its resident
        copies are kept like a prefetch not used yet, evicted last and never to make room for a prefetch. Without
        this, backward's prefetches of the next block push a queued gradient out to NVMe and read it back."""
        with self._lock:
            if chunk.buffers:
                chunk.prefetched = True

    def release(self, chunk: Chunk, tier: Tier, *, dirty: bool = False) -> None:
        """Stop holding `chunk` in `tier`; `dirty` says its bytes there were changed (other copies are stale)."""
        with self._lock:
            chunk.pins[tier] -= 1
            if dirty:
                self._mark_dirty(chunk, tier)
            self._lock.notify_all()

    def discard(self, chunk: Chunk, *, release_file: bool = False) -> None:
        """Forget the contents (zeros now), free the memory (a used gradient needs no write) and, with
        `release_file`, the swap file's disk space."""
        with self._lock:
            while id(chunk) in self._writing or id(chunk) in self._moving or chunk.loading:
                self._lock.wait(timeout=1.0)
            if any(chunk.pins.values()):
                raise RuntimeError(f"chunk {chunk.key} is discarded while still held")
            for tier in list(chunk.buffers):
                self._drop(chunk, tier)
            chunk.zero, chunk.dirty, chunk.on_nvme = True, None, False
            if release_file:  # no request of it is in flight: writes and loads were waited for
                self._files.release(chunk)
            self._lock.notify_all()

    def flush(self) -> None:
        """Write every chunk whose newest bytes are only in memory to its NVMe file, wait for every write in
        flight, and fsync."""
        if self.backend is None:
            return
        with self._lock:
            if not self.transport.shares_memory:  # CUDA: swap files are written from host memory, so stage there
                for chunk in self._chunks:
                    if chunk.only_copy_in(Tier.DEVICE) and not chunk.pinned(Tier.DEVICE):
                        self._evict(chunk, Tier.DEVICE)
            for chunk in self._chunks:
                tier = chunk.newest_tier
                if tier is not None and chunk.only_copy_in(tier) and id(chunk) not in self._writing:
                    self._write_back(chunk, tier, drop=False)
            while self._writing:
                self._lock.wait(timeout=1.0)
            if self._write_error is not None:
                raise self._write_error  # its own error (ENOSPC): a checkpoint's caller names the full disk
        self._files.sync()

    def commit(self, chunks: list[Chunk]) -> dict[str, VersionRef]:
        """Flush, then reference the swap file version of each of `chunks` for a checkpoint: from now on their
        writes go to new versions (chunk_files.py). Call with nothing changing the chunks (updates settled).

        Raises:
            OSError: a write failed (disk full): nothing is committed.
        """
        self.flush()
        with self._lock:
            # Ordering: writes start only under this lock, and every chunk is clean after the flush, so no write of
            # these chunks is in flight while their versions are committed (a later one goes to a new version).
            while self._writing:
                self._lock.wait(timeout=1.0)
            changed = [chunk.key for chunk in chunks if not chunk.zero and not chunk.on_nvme]
            if changed:
                raise RuntimeError(f"chunks {changed[:3]} changed during a checkpoint; this is a bug")
            return self._files.commit(chunks)

    def keep_version(self, chunk: Chunk) -> VersionRef:
        """Keep `chunk`'s present bytes in its swap file until `restore_version` or `drop`: called by the thread that
        holds it in host memory, before it changes them (a speculative update, updates.py). Bytes only in memory are
        written first (and waited for, on the caller's thread); bytes already in the file cost nothing. From now on
        the chunk's writes go to a new version (`ChunkFiles.pin`).

        Raises:
            OSError: the write failed (disk full).
        """
        with self._lock:
            while id(chunk) in self._writing:
                self._lock.wait(timeout=1.0)
            if not chunk.zero and not chunk.on_nvme:
                self._write_back(chunk, Tier.HOST, drop=False)  # the caller holds it there: the newest copy
                while id(chunk) in self._writing:
                    self._lock.wait(timeout=1.0)
                self._raise_write_error()
            return self._files.pin(chunk)

    def restore_version(self, chunk: Chunk, ref: VersionRef) -> None:
        """Make `chunk`'s contents those `keep_version` kept (`ref`), dropping what is in memory: the rollback of a
        speculative update. Nobody may hold the chunk.

        Ordering: one lock section from the wait to the swap of files, so no load of the chunk (a late prefetch)
        starts between them and reads the bytes being rolled back."""
        with self._lock:
            while id(chunk) in self._writing or id(chunk) in self._moving or chunk.loading:
                self._lock.wait(timeout=1.0)
            if any(chunk.pins.values()):
                raise RuntimeError(f"chunk {chunk.key} is rolled back while still held")
            for tier in list(chunk.buffers):
                self._drop(chunk, tier)
            chunk.dirty, chunk.prefetched = None, False
            if ref is None:  # it was all zeros
                self._files.release(chunk)
                chunk.zero, chunk.on_nvme = True, False
            else:
                self._files.restore(chunk, ref)
                chunk.zero, chunk.on_nvme = False, True
            self._lock.notify_all()

    def hold(self, names: list[str]) -> None:
        """Keep swap file versions a checkpoint of an earlier process references (see `ChunkFiles.hold`)."""
        with self._lock:
            self._files.hold(names)

    def drop(self, names: list[str]) -> None:
        """Forget one checkpoint's references to versions; those no kept checkpoint needs are deleted."""
        with self._lock:
            self._files.drop(names)

    def adopt(self, chunk: Chunk, ref: VersionRef) -> None:
        """Make `chunk`'s contents those of a held version (or zeros for None), without reading them."""
        self.discard(chunk, release_file=True)
        with self._lock:
            if ref is not None:
                self._files.adopt(chunk, ref)
                chunk.zero, chunk.on_nvme = False, True

    def spare_versions(self) -> list[str]:
        """Swap files kept for the next version of a chunk a speculative update writes (chunk_files.py)."""
        with self._lock:
            return self._files.spares()

    def version_path(self, name: str) -> Path:
        """The file of swap version `name`."""
        return self._files.path(name)

    def close(self) -> None:
        self._stager.shutdown(wait=True)
        for future in list(self._writing.values()):
            future.result()

    def resident_bytes(self) -> dict[str, int]:
        """Bytes in use per tier, for progress displays and tests."""
        with self._lock:
            return {tier.value: used for tier, used in self.used.items()}

    @property
    def pooled(self) -> int:
        """Bytes of free host-memory buffers kept for reuse (counted against the budgets beside `used`)."""
        return self._pool.nbytes

    # ------------------------------------------------------------------------------------------- loading

    def _ensure(self, chunk: Chunk, tier: Tier, *, best_effort: bool, ticket: Ticket | None = None) -> Future:
        """A future that completes (with a transport token) once `chunk` is present in `tier`.

        Every decision is re-checked after any wait (making room releases the lock), so two threads asking
        for the same chunk never both load it, and a chunk is never moved while it is written or loaded.
        `ticket`: a prefetch's, which does nothing once `PrefetchOrder` finds it stale (come too late).
        """
        with self._lock:
            while True:
                # A chunk being written, moved, or loaded into another tier is left alone until that finishes.
                while id(chunk) in self._writing or id(chunk) in self._moving or any(
                    loading is not tier for loading in chunk.loading
                ):
                    self._lock.wait(timeout=1.0)
                if self._order.stale(chunk, tier, ticket):
                    return completed()
                self._clock += 1
                chunk.last_use = self._clock
                if tier in chunk.buffers:
                    return completed(chunk.ready.get(tier))
                if tier in chunk.loading:
                    return chunk.loading[tier]
                other = Tier.HOST if tier is Tier.DEVICE else Tier.DEVICE
                moving = other in chunk.buffers and self.transport.shares_memory
                if moving and chunk.pinned(other):  # held there by another thread: wait for its release
                    self._lock.wait(timeout=1.0)
                    continue
                if tier is Tier.DEVICE and not self.transport.shares_memory and Tier.HOST not in chunk.buffers:
                    break  # CUDA, chunk only on NVMe: stage it through host memory first (below)
                had_other = other in chunk.buffers  # the copy this one is filled from (CUDA) or moved from (CPU)
                reserved = self._reserve_for(chunk, tier, best_effort, takes_buffer=not moving, prefetch=best_effort)
                if not reserved:
                    return completed()
                changed = tier in chunk.buffers or tier in chunk.loading or (other in chunk.buffers) != had_other
                if changed or self._order.stale(chunk, tier, ticket):
                    self.used[tier] -= chunk.nbytes  # the chunk changed while we made room: decide again
                    continue
                chunk.prefetched = best_effort
                return self._fill(chunk, tier, other if moving else None)
        self.acquire(chunk, Tier.HOST)
        try:
            return self._ensure(chunk, tier, best_effort=best_effort, ticket=ticket)
        finally:
            self.release(chunk, Tier.HOST)

    def _prefetch(self, chunk: Chunk, tier: Tier, ticket: Ticket) -> None:
        """The staging thread's part of `prefetch` (`_ensure` drops it if it comes too late)."""
        self._ensure(chunk, tier, best_effort=True, ticket=ticket)
        with self._lock:
            self._order.ran(chunk, tier, ticket)

    def _fill(self, chunk: Chunk, tier: Tier, move_from: Tier | None) -> Future:
        """Put the chunk's bytes into `tier`, whose room is already reserved. Called with the lock held."""
        if move_from is not None:  # CPU: the same buffer, re-charged from one budget to the other
            self._set_present(chunk, tier, chunk.buffers.pop(move_from))
            self.used[move_from] -= chunk.nbytes
            if chunk.dirty is move_from:
                chunk.dirty = tier
            self._lock.notify_all()
            return completed()
        buffer = self._take(tier, chunk.nbytes)
        other = Tier.HOST if tier is Tier.DEVICE else Tier.DEVICE
        if other in chunk.buffers:  # CUDA: copied from the other tier's copy (the newest, if either is dirty)
            chunk.ready[tier] = self.transport.copy(buffer, chunk.buffers[other])
            if tier is Tier.HOST:  # device -> host: waited for here; the device copy becomes a clean cache
                self.transport.ready_on_host(chunk.ready.pop(tier))
                chunk.dirty = Tier.HOST if chunk.dirty is Tier.DEVICE else chunk.dirty
            self._set_present(chunk, tier, buffer)
            return completed(chunk.ready.get(tier))
        if chunk.zero:
            buffer.zero_()
            self._set_present(chunk, tier, buffer)
            return completed()
        future = self._files.read(chunk, buffer)
        chunk.loading[tier] = future
        # The read completes on an I/O thread; only then is the buffer published as present, so a reader that
        # finds it in `buffers` never sees half-read bytes.
        future.add_done_callback(lambda f: self._loaded(chunk, tier, buffer, f))
        return future

    def _loaded(self, chunk: Chunk, tier: Tier, buffer: torch.Tensor, future: Future) -> None:
        with self._lock:
            del chunk.loading[tier]
            if future.exception() is None:
                self.bytes_read += chunk.nbytes
                self._set_present(chunk, tier, buffer)
            else:
                self.used[tier] -= chunk.nbytes
            self._lock.notify_all()

    def _move_down(self, chunk: Chunk, prefetch: bool) -> bool:
        """CPU eviction from device: re-charge an unheld chunk's bytes to the host budget if it has room now (lock
        held; `prefetch`: see `_reserve`). Returns False when it has not: waiting could deadlock, as the chunk
        making room in the device tier may be the very one whose move up would free the host tier."""
        room = self._reserve_for(chunk, Tier.HOST, best_effort=True, takes_buffer=False, prefetch=prefetch)
        if room:
            self._fill(chunk, Tier.HOST, Tier.DEVICE)
        return room

    def _set_present(self, chunk: Chunk, tier: Tier, buffer: torch.Tensor) -> None:
        chunk.buffers[tier] = buffer
        self.peak[tier] = max(self.peak[tier], self.used[tier])

    # ------------------------------------------------------------------------------------------ eviction

    def _reserve_for(self, chunk: Chunk, tier: Tier, best_effort: bool, *, takes_buffer: bool, prefetch: bool) -> bool:
        """`_reserve` room for `chunk` in `tier`, marked as moving meanwhile (lock held)."""
        self._moving.add(id(chunk))  # making room must not evict or move this very chunk
        try:
            return self._reserve(
                tier, chunk.nbytes, best_effort, exclude=chunk, takes_buffer=takes_buffer, prefetch=prefetch
            )
        finally:
            self._moving.discard(id(chunk))
            self._lock.notify_all()

    def _reserve(
        self, tier: Tier, nbytes: int, best_effort: bool, *, exclude: Chunk | None, takes_buffer: bool,
        prefetch: bool = False,
    ) -> bool:
        """Count `nbytes` against `tier`, evicting or waiting until they fit. Called with the lock held.

        `takes_buffer`: the caller goes on to `_take` a buffer of `nbytes` (a load), rather than re-charging
        a buffer it has (a move), so a kept buffer of that size is spared when the pool is trimmed.
        `prefetch`: the room is for a prefetch, which evicts no chunk prefetched and not used yet, here or in the
        host tier (CPU, moving a victim down)."""
        deadline = time.monotonic() + self.wait_limit_s
        while self.used[tier] + nbytes > self.limits[tier]:
            self._raise_write_error()
            victim = choose_victim(
                self._chunks, tier, exclude=exclude, busy=self._writing.keys() | self._moving,
                writes_in_flight=bool(self._writing), can_spill=self.backend is not None, prefetch=prefetch,
            )
            if victim is not None:
                self._evict(victim, tier, prefetch)
                continue
            if best_effort and not self._writing:
                return False
            if time.monotonic() > deadline or not (
                self._writing or may_free_later(self._chunks, tier, exclude=exclude, moving=self._moving)
            ):
                if best_effort:
                    return False
                raise no_room(self._chunks, tier, nbytes, self.used[tier], self.limits[tier])
            self._lock.wait(timeout=1.0)  # a write finishing or a release elsewhere frees room
        self.used[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.used[tier])
        if takes_buffer and tier in self._pool.tiers:  # a move re-charges a buffer: RAM in use stays the same
            self._pool.trim(sum(self.limits[t] - self.used[t] for t in self._pool.tiers), spare=nbytes)
        return True

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            directory = self.backend.directory if self.backend is not None else "the swap directory"
            raise write_failed(directory, self._write_error) from self._write_error

    def _take(self, tier: Tier, nbytes: int) -> torch.Tensor:
        """A buffer for `nbytes` already reserved in `tier`: a kept one of that size, else a new one."""
        kept = self._pool.take(nbytes) if tier in self._pool.tiers else None
        if kept is not None:
            return kept
        return self.transport.allocate(nbytes, on_device=tier is Tier.DEVICE)

    def _evict(self, chunk: Chunk, tier: Tier, prefetch: bool = False) -> None:
        """Free `chunk`'s bytes in `tier`, saving them one tier down first when they are the newest copy."""
        if tier is Tier.DEVICE:
            if Tier.HOST in chunk.buffers and chunk.dirty is not Tier.DEVICE:
                self._drop(chunk, tier)  # CUDA: the host copy is as new, the device copy was a cache
                return
            if not self.transport.shares_memory:
                self._reserve_for(chunk, Tier.HOST, False, takes_buffer=True, prefetch=False)  # no one else evicts it
                self._fill(chunk, Tier.HOST, None)  # the device -> host copy
                self._drop(chunk, tier)
                return
            if Tier.HOST in chunk.buffers:  # CPU: a stale host copy (the device one is newer): replace it
                self._drop(chunk, Tier.HOST)
            if self._move_down(chunk, prefetch):
                return
            # CPU, host tier full of chunks that cannot leave now: spill straight from device memory.
        if not chunk.only_copy_in(tier):
            self._drop(chunk, tier)
            return
        if self.backend is None:
            raise BudgetExceeded(
                f"the {tier.value} tier is full and {chunk.key} has no NVMe file to go to; set Budget.nvme or "
                "raise the budgets"
            )
        # Dirty bytes go to NVMe first; the memory stays counted until the write completes.
        self._write_back(chunk, tier, drop=True)

    def _write_back(self, chunk: Chunk, tier: Tier, *, drop: bool) -> None:
        """Start writing `chunk`'s bytes in `tier` to its file (lock held); `drop`: free them once written."""
        future = self._files.write(chunk, chunk.buffers[tier])
        self._writing[id(chunk)] = future
        future.add_done_callback(lambda f: self._written(chunk, tier, f, drop))

    def _written(self, chunk: Chunk, tier: Tier, future: Future, drop: bool) -> None:
        with self._lock:
            del self._writing[id(chunk)]
            self._lock.notify_all()
            if future.exception() is not None:  # disk full, I/O error: keep the bytes, fail the next demand
                self._write_error = future.exception()
                return
            self.bytes_written += chunk.nbytes
            chunk.on_nvme = True
            if chunk.dirty is tier:
                chunk.dirty = None
            if drop:
                self._drop(chunk, tier)

    def _drop(self, chunk: Chunk, tier: Tier) -> None:
        """Free the chunk's buffer in `tier`. Only for buffers nobody holds: see Note [Kept buffers are reused]."""
        buffer = chunk.buffers.pop(tier)
        self.used[tier] -= chunk.nbytes
        if tier in self._pool.tiers:
            self._pool.give(buffer, chunk.nbytes)

    def _mark_dirty(self, chunk: Chunk, tier: Tier) -> None:
        if chunk.source is not None:
            raise RuntimeError(f"chunk {chunk.key} is read-only (its bytes come from {chunk.source}); this is a bug")
        chunk.zero, chunk.on_nvme, chunk.dirty = False, False, tier
        for other in [t for t in chunk.buffers if t is not tier and not chunk.pinned(t)]:
            self._drop(chunk, other)  # a stale copy is worse than none
