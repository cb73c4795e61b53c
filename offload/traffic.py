"""Bytes a training step moves between the tiers, found by running the step's chunk traffic through a real
`ChunkStore` whose buffers are meta tensors and whose NVMe files are counters.

Eviction under a byte budget is too path-dependent for a formula (what the end of forward leaves resident is
what backward re-reads), so the planner replays the engine's order of acquires, releases and prefetches on the
store itself: the same eviction policy, the same chunk sizes, no memory and no disk. The order below mirrors
first_order.py, zeroth_order.py and updates.py (`tests/offload/test_cost_model.py` checks the bytes against a
real engine, so a change there that this file misses fails a test). Prefetches run inline rather than on the
staging thread: the store's rules make a prefetch that comes late do nothing, so inline is the order they aim
for.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..optim.layout import chunk_nbytes
from .block_layout import BlockLayout, chunk_specs
from .blocks import BlockPlan
from .chunks import Chunk, Tier
from .device import Transport
from .store import ChunkStore
from .swap import completed

__all__ = ["Traffic", "simulate_traffic"]


@dataclass(frozen=True)
class Traffic:
    """Bytes per training step on each link, in steady state, and what the tiers and swap files peak at."""

    disk_read: int  # NVMe swap files and the model's own safetensors (frozen weights) -> host memory
    disk_write: int  # host memory -> NVMe swap files
    host_to_device: int  # 0 where device and host are one RAM (CPU)
    device_to_host: int
    peak_device: int
    peak_host: int
    swap_bytes: int  # bytes the swap files hold at the most (the chunks ever written)
    setup_write: int  # bytes written before the first step (weights copied in, then evicted)
    converted: int = 0  # chunk bytes made from frozen files stored in another dtype (CPU time beside compute)


class _Inline(Executor):
    """Runs each prefetch at once on the calling thread."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        return completed(fn(*args, **kwargs))


class _CountingFile:
    """A swap file (or a frozen chunk's safetensors source) that moves no bytes; the store counts them."""

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future:
        return completed()

    def write_from(self, src: torch.Tensor, offset: int = 0) -> Future:
        return completed()

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Sources:
    """What the frozen chunks' safetensors sources delivered: chunk bytes (as the store counts them) and the bytes
    of the files themselves, which may hold a narrower dtype than the compute dtype the chunks are read into."""

    ratio: float  # file bytes per chunk byte
    chunk_bytes: int = 0
    file_bytes: int = 0


class _SourceFile(_CountingFile):
    def __init__(self, sources: _Sources) -> None:
        self.sources = sources

    def read_into(self, dest: torch.Tensor, offset: int = 0) -> Future:
        nbytes = dest.numel() * dest.element_size()
        self.sources.chunk_bytes += nbytes
        self.sources.file_bytes += int(nbytes * self.sources.ratio)
        return completed()


class _CountingBackend:
    directory = Path("(simulated)")

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def open(self, name: str, nbytes: int) -> _CountingFile:
        self.sizes[name] = nbytes
        return _CountingFile()

    def remove(self, swap: _CountingFile) -> None:
        pass  # the replay never spills a gradient its update consumes: the worker runs inline

    def detach(self, swap: _CountingFile) -> None:
        pass  # a version kept by a speculative update (chunk_files.py): its size stays counted

    def own(self, swap: _CountingFile) -> None:
        pass

    def delete(self, name: str) -> None:
        pass


class _MetaTransport(Transport):
    """Buffers on the meta device; copies between device and host counted by direction."""

    def __init__(self, shares_memory: bool) -> None:
        self.shares_memory = shares_memory
        self._on_device: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.to_device = self.to_host = 0

    def allocate(self, nbytes: int, *, on_device: bool) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device="meta")
        if on_device:
            self._on_device[id(buffer)] = buffer
        return buffer

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._on_device.get(id(dst)) is dst:
            self.to_device += dst.numel() * dst.element_size()
        else:
            self.to_host += dst.numel() * dst.element_size()

    def ready(self, token: object | None) -> None:
        pass

    def ready_on_host(self, token: object | None) -> None:
        pass


@dataclass
class _Block:
    """One block's chunks in the simulated store."""

    is_layer: bool
    trainable: bool  # it has parameters to train (else its trainable chunks are empty)
    weights: Chunk
    frozen: Chunk | None
    grads: Chunk | None  # None: zeroth-order
    master: Chunk | None
    states: list[Chunk]

    @property
    def update(self) -> list[Chunk]:
        """What an update acquires beside the weights and gradients, and what is prefetched for it."""
        return ([self.master] if self.master is not None else []) + self.states


class _Replay:
    """The engine's chunk traffic, step by step, on a simulated store."""

    def __init__(self, store: ChunkStore, blocks: list[_Block], plan: BlockPlan, prefetch: int) -> None:
        self.store, self.blocks, self.plan, self.depth = store, blocks, plan, prefetch
        self.first_layer = min(i for i, b in enumerate(blocks) if b.is_layer)
        self._speculative = False  # this step's updates are exact clipping's speculative ones
        self._kept: list[str] = []  # the swap versions they keep

    def _parts(self, index: int) -> list[Chunk]:
        block = self.blocks[index]
        return [block.weights] + ([block.frozen] if block.frozen is not None else [])

    def hold(self, index: int, grads: bool = False) -> None:
        for chunk in self._parts(index) + ([self.blocks[index].grads] if grads else []):
            self.store.acquire(chunk, Tier.DEVICE)

    def release(self, index: int, grads: bool = False) -> None:
        if grads:
            self.store.release(self.blocks[index].grads, Tier.DEVICE, dirty=True)
        for chunk in self._parts(index):
            self.store.release(chunk, Tier.DEVICE)

    def prefetch(self, indices: range, grads: bool = False) -> None:
        for index in indices:
            if 0 <= index < len(self.blocks):
                for chunk in self._parts(index):
                    self.store.prefetch(chunk, Tier.DEVICE)
                block = self.blocks[index]
                if grads and block.grads is not None and not block.grads.zero:
                    self.store.prefetch(block.grads, Tier.DEVICE)

    def copy_in(self) -> None:
        """Weights (and frozen weights without a source file) written into their chunks before the first step."""
        for block in self.blocks:
            chunks = [block.weights, block.master] if block.trainable else []
            chunks.append(block.frozen if block.frozen is not None and block.frozen.source is None else None)
            for chunk in filter(None, chunks):
                self.store.acquire(chunk, Tier.HOST)
                self.store.release(chunk, Tier.HOST, dirty=True)

    def update(self, index: int, speculative: bool = False) -> None:
        """updates.UpdateWorker._update: weights, master, gradients, states in host memory; gradients discarded.
        `speculative`: exact clipping's (Note [Speculative updates]): what it writes is kept as swap versions first,
        until the step's validation (`commit`)."""
        block = self.blocks[index]
        chunks = [block.weights, *block.update, block.grads]
        for chunk in chunks:
            self.store.acquire(chunk, Tier.HOST)
        if speculative:
            self._kept += [ref[0] for ref in map(self.store.keep_version, chunks[:-1]) if ref is not None]
        for chunk in chunks[:-1]:
            self.store.release(chunk, Tier.HOST, dirty=True)
        self.store.release(block.grads, Tier.HOST)
        self.store.discard(block.grads)

    def commit(self) -> None:
        """updates.UpdateWorker.commit: a speculative step that needed no clipping stands."""
        self.store.drop(self._kept)
        self._kept = []

    def first_order_step(self, accumulation: int, updates_in_backward: bool, speculative: bool = False) -> None:
        """`speculative`: exact clipping with a swap directory, replayed as a step that needed no clipping."""
        self._speculative = speculative
        updates_in_backward = updates_in_backward or speculative
        points = [point.blocks for point in self.plan.hook_points]
        layer_points = [i for i, blocks in enumerate(points) if self.blocks[blocks[0]].is_layer]
        before, after = points[: layer_points[0]], points[layer_points[-1] + 1 :]
        for micro in range(accumulation):
            last = micro == accumulation - 1
            for blocks in points:  # forward: residency.before_forward / after_forward
                for index in blocks:
                    self.hold(index)
                self.prefetch(range(blocks[-1] + 1, blocks[-1] + 1 + self.depth), grads=True)
                for index in blocks:
                    self.release(index)
            # outer_holds.py: the head's side is held for its own backward only; a block the embedding's side
            # also uses (a tied head) completes at the embedding's backward, the last, and under accumulation (one
            # tied Parameter) stays held until then.
            outer_before = [i for blocks in reversed(before) for i in blocks if self.blocks[i].trainable]
            held = [i for blocks in reversed(after) for i in blocks]  # the head's backward first
            kept = [i for i in dict.fromkeys(held) if i in outer_before] if accumulation > 1 else []
            for index in kept:
                self.hold(index, grads=True)
            self._outer_backward(held, [i for i in dict.fromkeys(held) if i not in outer_before], last,
                                 updates_in_backward)
            for index in reversed([points[i][0] for i in layer_points]):
                self._layer_backward(index, last, updates_in_backward)
            self._outer_backward(outer_before, list(dict.fromkeys(outer_before)), last, updates_in_backward)
            for index in kept:
                self.release(index, grads=True)
        if not updates_in_backward:
            for index, block in enumerate(self.blocks):
                if block.trainable:
                    self.update(index)
        if speculative:
            self.commit()
        self.prefetch(range(self.depth))

    def _outer_backward(self, held: list[int], completing: list[int], last: bool, updates_in_backward: bool) -> None:
        """outer_holds.OuterHolds: hold `held` for their modules' backward, release; `completing` may update."""
        for index in held:
            self.hold(index, grads=self.blocks[index].trainable)
        for index in held:
            self.release(index, grads=self.blocks[index].trainable)
        if last and updates_in_backward:
            for index in completing:
                if self.blocks[index].trainable:
                    self.update(index, self._speculative)

    def _layer_backward(self, index: int, last: bool, updates_in_backward: bool) -> None:
        """first_order.FirstOrderStep.begin_layer_backward / end_layer_backward."""
        block = self.blocks[index]
        self.hold(index, grads=block.trainable)
        self.prefetch(range(index - 1, index - 1 - self.depth, -1), grads=True)
        if last:
            upcoming = [index] + ([i for i, b in enumerate(self.blocks) if not b.is_layer]
                                  if index == self.first_layer else [])
            for chunk in [chunk for i in upcoming for chunk in self.blocks[i].update]:
                self.store.prefetch(chunk, Tier.HOST)
        self.release(index, grads=block.trainable)
        if last and block.trainable and updates_in_backward:
            self.update(index, self._speculative)

    def zeroth_order_step(self, first: bool) -> None:
        """zeroth_order.ZerothOrderStep.step: a block both ends use held throughout; each block updated once (not
        on the first step: no pending update), in the order of the forward."""
        before, after = self.plan.outer_sides()
        outer = [i for i in before if i in after]
        for index in outer:
            self.hold(index)
        fresh: set[int] = set()
        for point in self.plan.hook_points:
            for index in point.blocks:
                self.hold(index)
            self.prefetch(range(point.blocks[-1] + 1, point.blocks[-1] + 1 + self.depth))
            for index in point.blocks:
                if index not in fresh and not first:
                    self.store.acquire(self.blocks[index].weights, Tier.DEVICE)
                    self.store.release(self.blocks[index].weights, Tier.DEVICE, dirty=True)
                fresh.add(index)
            for index in point.blocks:
                self.release(index)
        for index in outer:
            self.release(index)


def _blocks(store: ChunkStore, layouts: list[BlockLayout], optimizer: Any, compute_dtype: torch.dtype,
            sources: _Sources | None) -> list[_Block]:
    """The chunks `block_state.block_states` creates, with the same sizes, keys and `keep`."""
    adapters = any(b.frozen is not None for b in layouts)
    blocks = []
    for b in layouts:
        chunks = {role: store.create(f"{b.block.name}/{role}", spec.numel, spec.dtype,
                                     chunk_nbytes(spec.numel, spec.dtype), keep=adapters)
                  for role, spec in chunk_specs(b.trainable, compute_dtype, optimizer).items()}
        frozen = None
        if b.frozen is not None:
            key = f"{b.block.name}/frozen"
            if b.quantized is not None:
                frozen = store.create(key, b.quantized.nbytes, torch.uint8, b.quantized.nbytes)
            else:
                source = _SourceFile(sources) if sources is not None else None
                frozen = store.create(key, b.frozen.numel, compute_dtype, b.frozen.nbytes(compute_dtype), source=source)
        weights, grads, master = chunks.pop("weights"), chunks.pop("grads", None), chunks.pop("master", None)
        trainable = bool(b.trainable.slots)
        blocks.append(_Block(b.block.is_layer, trainable, weights, frozen, grads, master, list(chunks.values())))
    return blocks


def simulate_traffic(
    layouts: list[BlockLayout],
    plan: BlockPlan,
    optimizer: Any,
    compute_dtype: torch.dtype,
    *,
    device_bytes: int,
    host_bytes: int,
    nvme: bool,
    shares_memory: bool,
    prefetch: int = 2,
    accumulation_steps: int = 1,
    updates_in_backward: bool = False,
    speculative: bool = False,
    frozen_file_dtype: torch.dtype | None = None,
    steps: int = 3,
) -> Traffic:
    """Replay `steps` training steps and report the bytes of the last one (the first fills the caches).

    `device_bytes` is the device tier's room for chunks (the engine's budget less the held compute copies,
    `block_layout.compute_copies_nbytes`); `frozen_file_dtype`: the dtype of the model's safetensors when frozen
    chunks are read from them (a model directory; `disk_read` counts the files' bytes), else None: frozen chunks
    are copied in and swapped like any chunk. `speculative`: exact clipping with a swap directory (clipping.py),
    each step replayed as one that needed no clipping (its speculative updates stand).
    """
    from ..optim.mezo import MeZO

    backend = _CountingBackend() if nvme else None
    transport = _MetaTransport(shares_memory)
    # One thread: a wait could never end (nobody else releases), so a budget the replay cannot meet raises at once.
    store = ChunkStore(device_bytes, host_bytes, transport, backend, wait_limit_s=0.0, stager=_Inline())  # type: ignore[arg-type]
    sources = None
    if frozen_file_dtype is not None:
        sources = _Sources(frozen_file_dtype.itemsize / compute_dtype.itemsize)
    replay = _Replay(store, _blocks(store, layouts, optimizer, compute_dtype, sources), plan, prefetch)
    replay.copy_in()
    setup_write = store.bytes_written
    counters = (0, 0, 0, 0)
    frozen = _Sources(1.0)  # the sources' counts at the start of the last step
    for step in range(steps):
        counters = (store.bytes_read, store.bytes_written, transport.to_device, transport.to_host)
        if sources is not None:
            frozen = _Sources(sources.ratio, sources.chunk_bytes, sources.file_bytes)
        if isinstance(optimizer, MeZO):
            replay.zeroth_order_step(first=step == 0)
        else:
            replay.first_order_step(accumulation_steps, updates_in_backward, speculative)
    store.close()
    swap = sum(backend.sizes.values()) if backend is not None else 0
    return Traffic(
        disk_read=store.bytes_read - counters[0] - _delta(sources, frozen, "chunk_bytes")
        + _delta(sources, frozen, "file_bytes"), disk_write=store.bytes_written - counters[1],
        host_to_device=transport.to_device - counters[2], device_to_host=transport.to_host - counters[3],
        peak_device=store.peak[Tier.DEVICE], peak_host=store.peak[Tier.HOST], swap_bytes=swap,
        setup_write=setup_write,
        converted=_delta(sources, frozen, "chunk_bytes") if sources is not None and sources.ratio != 1 else 0,
    )


def _delta(sources: _Sources | None, before: _Sources, field: str) -> int:
    return getattr(sources, field) - getattr(before, field) if sources is not None else 0
