"""Activation offload: a layer's saved tensors leave memory as its forward makes them, and come back, read ahead,
for its backward. The third way (beside recompute.py's two) to bridge a layer's forward and its backward.

`OffloadedLayer` builds the layer's graph as `StreamedLayer` does, under saved-tensor hooks that give each tensor
autograd saves for backward to an `ActivationStore`:

- a saved view of a held weight chunk still goes through `runner.saved_weights` (Note [Saved weight views],
  residency.py): a reference re-made from the block's buffer at backward, never copied out;
- a tensor under `small_bytes`, one on another device, or the layer's own input (the layer call keeps that one
  anyway, for its gradient) stays in the graph as it is;
- every other one is copied into a host buffer of the store (on CUDA: pinned, on a copy stream) and written to
  one file in the engine's swap directory through the engine's NVMe backend. On CPU every tensor is written at
  once (host memory is the same RAM: only the disk frees it); on CUDA the pinned copy stays in host memory and is
  written only when the store's bytes pass its limit, oldest first.

The store's memory (host copies waiting for their writes, tensors read back, and on CPU the freed buffers it
keeps for the next tensor of their size) is kept within `limit_bytes`:
a save waits for earlier writes to finish when there is no room. Backward visits layers in reverse, so when a
layer's backward starts its own tensors and those of the layer before it are read back, as far as the limit has
room, and the reads overlap this layer's backward; what is not read ahead is read when autograd asks for it
(a layer's backward needs its own tensors whatever the limit); a copy whose write has not finished when its
backward comes serves it from memory. A layer's tensors are let go of when its backward ends (or when its graph is
dropped without one), and the file's bytes are reused once no layer's are left. The file is not covered by
`verify_swap`'s checksums: it lives for one step.

Exact: nothing is recomputed, and every tensor comes back with its bytes, shape and strides (a saved tensor that
is not dense, such as a slice, comes back contiguous), so dropout masks and results are those of plain PyTorch.

Threads: packs, unpacks, prefetches and releases run on the compute thread (autograd's unpack too: it runs in
the layer's backward). Writes complete on the backend's I/O threads, whose callbacks publish them under the
store's lock (a save waiting for room waits on that lock's condition); a read is published by the compute thread
once it has seen the read's future resolve. On CUDA a write waits for its copy's event on the "activation-spill"
thread, never on the compute thread.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ..optim.layout import round_up
from .buffer_pool import BufferPool
from .helper_threads import helper_pool
from .host_memory import aligned_empty
from .recompute import LayerRunner, backward_through, detached_inputs, input_grads, remember_call
from .swap import SwapBackend, SwapFileIO, write_failed

__all__ = ["ACTIVATION_MEMORY", "SMALL_BYTES", "ActivationStore", "OffloadRunner", "OffloadedLayer"]

ACTIVATION_MEMORY = 256 * 2**20
"""The engine's default `activation_memory`: room for the writes of a few layers in flight and the reads of the next."""

SMALL_BYTES = 64 * 1024
"""Saved tensors smaller than this stay in memory: their I/O would cost more in latency than their bytes free."""

FILE_NAME = "activations.swap"


class Place(Enum):
    """Where a saved tensor's bytes are."""

    HOST = "host"  # a host buffer of the store (a write of it may be in flight)
    DISK = "disk"  # only in the file
    READING = "reading"  # being read back into a host buffer


@dataclass(eq=False)
class Saved:
    """One saved tensor, out of the graph: what autograd keeps in its place until backward unpacks it."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # of the tensor; its buffer and file range are rounded up to 4096 bytes (O_DIRECT)
    place: Place = Place.HOST
    host: torch.Tensor | None = None  # uint8 buffer, counted in the store's held bytes while set
    offset: int | None = None  # in the file, once a write has started
    write: Future | None = None  # in flight
    read: Future | None = None  # the read back, once started (counted by `_landed` when seen done)
    event: Any = None  # CUDA: recorded after the device -> host copy
    wanted: bool = False  # its backward is near: keep the host copy when its write finishes
    released: bool = False  # its layer's backward is done


@dataclass(eq=False)
class SavedGroup:
    """One layer call's saved tensors, in the order forward saved them."""

    inputs: frozenset[int]  # storage addresses of the layer's inputs: kept by the layer call, never written
    entries: list[Saved] = field(default_factory=list)
    # Note [Saved twice]: several ops save the same tensor (q, k and v projections save one input), each its own
    # view. A key of (address, offset, shape, stride, dtype) finds the entry already made; the weak reference to the
    # tensor first saved proves the address still belongs to it (alive, it holds its storage). Its bytes are those
    # of the first save: plain PyTorch refuses a backward through a saved tensor changed in place since.
    seen: dict[tuple, tuple[weakref.ref, Saved]] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightRef:
    """A saved weight view, packed by `runner.saved_weights` (Note [Saved weight views])."""

    packed: Any


class ActivationStore:
    """Saved tensors of the layers between their forward and their backward, in a file of the swap directory.

    Args:
        backend: the engine's NVMe backend (its swap directory holds the file).
        device: the compute device; tensors on it are offloaded.
        limit_bytes: host memory the store may hold (copies waiting for their writes, tensors read back); a
            layer's backward may take more on demand, its own tensors being needed whatever the limit.
        small_bytes: tensors below this stay in the graph (default `SMALL_BYTES`, read when the store is made).
    """

    def __init__(self, backend: SwapBackend, device: torch.device, *, limit_bytes: int,
                 small_bytes: int | None = None) -> None:
        self.backend, self.device = backend, device
        self.limit = limit_bytes
        self.small = SMALL_BYTES if small_bytes is None else small_bytes
        self.cuda = device.type == "cuda"
        self.held = 0  # bytes of host buffers of live entries
        self.peak = 0
        self.bytes_written = self.bytes_read = 0
        self.bytes_unread = 0  # written, but backward wanted them before the write ended: served from memory
        self._file: SwapFileIO | None = None
        self._end = 0  # the file's next free byte
        self._groups: list[weakref.ref[SavedGroup]] = []  # live (backward not yet done), in forward order
        self._writing = 0  # writes in flight
        self._error: BaseException | None = None  # a failed write, raised at the next pack or unpack
        self._lock = threading.Condition()
        # CPU: freed buffers are reused (fresh ones page-fault their way in: 1.1 CPU s a step on stream_overhead's
        # model); CUDA's pinned buffers are left to torch's pinned allocator, which knows when copies are done.
        self._kept = None if self.cuda else BufferPool(())
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._spiller = helper_pool(1, "activation-spill") if self.cuda else None

    # ----------------------------------------------------------------------------------------------- forward

    def begin(self, inputs: Sequence[torch.Tensor]) -> SavedGroup:
        """A new group for one layer call whose tensor arguments are `inputs`."""
        group = SavedGroup(frozenset(t.untyped_storage().data_ptr() for t in inputs))
        with self._lock:
            self._groups.append(weakref.ref(group))
        # A graph dropped without its backward (a forward under no_grad, an error) drops the call's ctx and with it
        # the group: its tensors are let go of then, as `release` would.
        weakref.finalize(group, self._let_go, group.entries)
        return group

    def hooks(self, group: SavedGroup, weights: torch.autograd.graph.saved_tensors_hooks
              ) -> torch.autograd.graph.saved_tensors_hooks:
        """Saved-tensor hooks for the layer call of `group`, over the weight hooks `weights` (only the innermost
        hooks apply, so these hand weight views to those)."""

        def pack(tensor: torch.Tensor) -> Any:
            packed = weights.pack_hook(tensor)
            if packed is not tensor:
                return WeightRef(packed)
            return self.pack(group, tensor)

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, WeightRef):
                return weights.unpack_hook(packed.packed)
            return self.unpack(packed) if isinstance(packed, Saved) else packed

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def pack(self, group: SavedGroup, tensor: torch.Tensor) -> Saved | torch.Tensor:
        """Take `tensor` out of memory (asynchronously), or return it as it is (small, elsewhere, an input)."""
        if self._stays(group, tensor):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
               tensor.dtype)
        first = group.seen.get(key)
        if first is not None and first[0]() is not None:  # Note [Saved twice]
            return first[1]
        stride = torch.empty_like(tensor, device="meta").stride()  # dense layouts keep theirs (exactness)
        entry = Saved(tensor.shape, stride, tensor.dtype, tensor.numel() * tensor.element_size())
        self._make_room(round_up(entry.nbytes))
        with self._lock:
            entry.host = self._host_buffer(entry.nbytes)
            self._count(len(entry.host))
        self._copy_out(entry, tensor)
        group.entries.append(entry)
        group.seen[key] = (weakref.ref(tensor), entry)
        if not self.cuda:
            self._write([entry])  # CPU: only the disk frees memory
        return entry

    def _stays(self, group: SavedGroup, tensor: torch.Tensor) -> bool:
        return (tensor.numel() * tensor.element_size() < self.small or tensor.device != self.device
                or tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg()
                or tensor.untyped_storage().data_ptr() in group.inputs)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """A buffer for `nbytes` (under the lock): one kept from a freed entry of that size, else a new one, after
        letting kept buffers go until the new one fits in the limit beside them."""
        if self._kept is None:
            return aligned_empty(nbytes, pin_memory=True)
        size = round_up(nbytes)
        buffer = self._kept.take(size)
        if buffer is None:
            self._kept.trim(max(self.limit - self.held - size, 0), 0)
            buffer = aligned_empty(size)
        return buffer

    def _copy_out(self, entry: Saved, tensor: torch.Tensor) -> None:
        """`tensor`'s bytes into the entry's host buffer, with the entry's strides."""
        view = _typed(entry, entry.host)
        if not self.cuda:
            view.copy_(tensor)
            return
        current = torch.cuda.current_stream(self.device)
        # The copy stream waits for the kernels queued so far, so the copy reads the finished tensor.
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            view.copy_(tensor, non_blocking=True)
            entry.event = torch.cuda.Event()
            entry.event.record(self._stream)
        # The caching allocator must not hand `tensor`'s memory to the compute stream before the copy has read it.
        tensor.record_stream(self._stream)

    def _make_room(self, nbytes: int) -> None:
        """Wait until `nbytes` more fit in the limit, writing the oldest host copies out (CUDA) and waiting for
        writes in flight; with none left to wait for, go over (the caller's tensor exists already)."""
        while True:
            with self._lock:
                self._raise_error()
                if self.held + nbytes <= self.limit:
                    return
                spill = [] if not self.cuda else self._oldest_unwritten(self.held + nbytes - self.limit)
                if not spill:
                    if self._writing == 0:
                        return
                    self._lock.wait(timeout=1.0)  # a write's callback frees its host copy and notifies
                    continue
            self._write(spill)

    def _oldest_unwritten(self, nbytes: int) -> list[Saved]:
        """Host copies not written yet and not wanted soon, oldest first, adding up to `nbytes` (under the lock)."""
        chosen, total = [], 0
        for group in self._live():
            for entry in group.entries:
                if total >= nbytes:
                    return chosen
                if entry.place is Place.HOST and entry.offset is None and not entry.wanted:
                    chosen.append(entry)
                    total += len(entry.host)
        return chosen

    def _write(self, entries: list[Saved]) -> None:
        """Start writing each of `entries` (host copies) to the file."""
        file = self._open()
        for entry in entries:
            with self._lock:
                entry.offset, self._end = self._end, self._end + len(entry.host)
                self._writing += 1
            if self.cuda:
                # The write waits (on the spill thread) for the device -> host copy's event, so it never writes bytes
                # the copy has not landed yet; the compute thread does not wait.
                entry.write = self._spiller.submit(_write_after, entry.event, file, entry.host, entry.offset)
            else:
                entry.write = file.write_from(entry.host, entry.offset)
            # Registered once `entry.write` is set: a write already done runs its callback here, after that.
            entry.write.add_done_callback(lambda future, entry=entry: self._written(entry, future))

    def _written(self, entry: Saved, future: Future) -> None:
        """A write finished (an I/O thread): publish it, and free the host copy unless its backward wants it."""
        with self._lock:
            self._writing -= 1
            entry.write = None
            error = future.exception()
            if error is not None:
                self._error = self._error or write_failed(self.backend.directory, error)
            else:
                self.bytes_written += len(entry.host)
                if entry.wanted:  # its backward came first: the copy in memory served it (or will), never read
                    self.bytes_unread += len(entry.host)
                if entry.released or not entry.wanted:  # released: its backward is over, whenever the write ended
                    entry.place = Place.DISK
                    self._free(entry)
            self._rewind()
            self._lock.notify_all()

    def _open(self) -> SwapFileIO:
        if self._file is None:
            self._file = self.backend.open(FILE_NAME, 0)  # the file grows as it is written
        return self._file

    # ---------------------------------------------------------------------------------------------- backward

    def before(self, group: SavedGroup) -> SavedGroup | None:
        """The live group saved just before `group` (the layer whose backward comes next), or None."""
        with self._lock:
            live = self._live()
            position = live.index(group) if group in live else 0
            return live[position - 1] if position > 0 else None

    def prefetch(self, group: SavedGroup | None) -> None:
        """Start reading `group`'s tensors back, in saving order, while the limit has room."""
        if group is None:
            return
        with self._lock:
            for entry in group.entries:
                entry.wanted = True
            reads = []
            for entry in group.entries:
                if entry.place is Place.DISK:
                    if self.held + round_up(entry.nbytes) > self.limit:
                        break
                    reads.append(self._start_read(entry))
        for start in reads:
            start()

    def unpack(self, entry: Saved) -> torch.Tensor:
        """`entry`'s tensor again, on the compute device: what autograd asks for in backward."""
        with self._lock:
            self._raise_error()
            entry.wanted = True
            start = self._start_read(entry) if entry.place is Place.DISK else None
        if start is not None:
            start()
        if entry.read is not None:
            entry.read.result()  # waits for the disk: a read that prefetch did not start early enough
            self._landed(entry)
        host = _typed(entry, entry.host)
        if not self.cuda:
            return host
        with torch.cuda.stream(self._stream):  # allocated and filled on the copy stream, after its D2H copy
            tensor = torch.empty_strided(entry.shape, entry.stride, dtype=entry.dtype, device=self.device)
            tensor.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # GPU-side wait: backward's kernels run after the host -> device copy
        tensor.record_stream(current)  # ... and its memory is not reused before they are done
        return tensor

    def _start_read(self, entry: Saved) -> Callable[[], None]:
        """Claim a host buffer for `entry`'s read (under the lock); returns what starts the read (outside it)."""
        entry.host = self._host_buffer(entry.nbytes)
        entry.place = Place.READING
        self._count(len(entry.host))
        file = self._open()

        def start() -> None:
            entry.read = file.read_into(entry.host, entry.offset)

        return start

    def _landed(self, entry: Saved) -> None:
        """`entry`'s read is done (the compute thread saw its future resolve): count it once. Counted here, not in
        a done-callback, which may run after the caller has seen the future resolve and moved on."""
        with self._lock:
            if entry.place is Place.READING and entry.read.exception() is None:
                entry.place = Place.HOST
                self.bytes_read += round_up(entry.nbytes)

    def release(self, group: SavedGroup) -> None:
        """`group`'s backward is done: let its tensors go (autograd has unpacked what it needed)."""
        with self._lock:
            self._groups = [ref for ref in self._groups if ref() is not group]
        group.seen.clear()
        self._let_go(group.entries)

    def _let_go(self, entries: list[Saved]) -> None:
        """Free the host buffers of a group's `entries` (once: again, it finds nothing left to free)."""
        for entry in entries:
            if entry.read is not None:
                entry.read.exception()  # waits: no read may still fill a buffer, or a file range reused, after this
                self._landed(entry)
        with self._lock:
            for entry in entries:
                entry.released = True
                if entry.write is None:  # one in flight frees it when it finishes
                    self._free(entry)
            self._rewind()
            self._lock.notify_all()

    def wait_for_writes(self) -> None:
        """Return once no write is in flight (each one's callback has published it)."""
        with self._lock:
            while self._writing:
                self._lock.wait(timeout=1.0)

    def close(self) -> None:
        """Wait for the writes in flight, then remove the file."""
        self.wait_for_writes()
        if self._spiller is not None:
            self._spiller.shutdown(wait=True)
        if self._file is not None:
            self.backend.remove(self._file)
            self._file = None

    def stats(self) -> dict[str, int]:
        """Bytes written, read back, and written but served from memory (backward came before the write ended), and
        bytes of host memory held now and at most."""
        return {"activation_bytes_written": self.bytes_written, "activation_bytes_read": self.bytes_read,
                "activation_bytes_unread": self.bytes_unread, "activation_bytes_held": self.held,
                "peak_activations": self.peak}

    # ----------------------------------------------------------------------------------------------- helpers

    def _count(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def _free(self, entry: Saved) -> None:
        """Let go of `entry`'s host buffer (under the lock). A tensor autograd unpacked from it keeps the memory
        until backward drops it; the count follows the store's own references. A buffer nobody else holds (as its
        storage's reference count shows; the I/O threads keep none past a request: nvme.py `_Once`) is kept for
        the next entry of its size (CPU), as long as kept and held buffers fit in the limit together."""
        if entry.host is not None:
            self.held -= len(entry.host)
            if self._kept is not None and _held_only_here(entry.host):
                self._kept.give(entry.host, len(entry.host))
                self._kept.trim(max(self.limit - self.held, 0), 0)
            entry.host = None

    def _live(self) -> list[SavedGroup]:
        """The groups whose backward has not run, in forward order (under the lock; drops those garbage-collected)."""
        self._groups = [ref for ref in self._groups if ref() is not None]
        return [group for group in (ref() for ref in self._groups) if group is not None]

    def _rewind(self) -> None:
        """No layer's tensors left and no write in flight: the file's bytes may be reused from the start."""
        if not self._live() and self._writing == 0:
            self._end = 0

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _held_only_here(buffer: torch.Tensor) -> bool:
    """No view of `buffer` is alive elsewhere (autograd let go of what it unpacked): its storage's references are
    `buffer`'s own and the one this check makes. Only such a buffer may be handed to another entry."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2


def _typed(entry: Saved, buffer: torch.Tensor) -> torch.Tensor:
    """The entry's tensor over its uint8 `buffer`: dtype, shape and strides as saved."""
    return buffer[: entry.nbytes].view(entry.dtype).as_strided(entry.shape, entry.stride)


def _write_after(event: Any, file: SwapFileIO, buffer: torch.Tensor, offset: int) -> None:
    event.synchronize()  # host wait, on the spill thread only: the device -> host copy has landed
    file.write_from(buffer, offset).result()


class OffloadRunner:
    """A `LayerRunner` (the first-order step) with the store its offloaded layer calls save to."""

    def __init__(self, runner: LayerRunner, store: ActivationStore) -> None:
        self.runner, self.activations = runner, store

    def begin_layer_backward(self, index: int) -> None:
        self.runner.begin_layer_backward(index)

    def end_layer_backward(self, index: int) -> None:
        self.runner.end_layer_backward(index)

    def saved_weights(self) -> torch.autograd.graph.saved_tensors_hooks:
        return self.runner.saved_weights()


class OffloadedLayer(torch.autograd.Function):
    """A layer call whose graph's saved tensors are offloaded: `apply(runner, index, device, function, *args)`,
    with an `OffloadRunner`."""

    @staticmethod
    def forward(
        ctx: Any, runner: OffloadRunner, index: int, device: torch.device, function: Callable[..., Any], *args: Any
    ) -> Any:
        remember_call(ctx, runner, index, device, function, args)
        call_args = detached_inputs(ctx, args, [arg for arg in args if torch.is_tensor(arg)])
        store = runner.activations
        ctx.group = store.begin(ctx.inputs)
        with torch.enable_grad(), store.hooks(ctx.group, runner.saved_weights()):
            ctx.outputs = function(*call_args)  # the layer's graph, its saved tensors in the store
        if isinstance(ctx.outputs, tuple):
            return tuple(t.detach() if torch.is_tensor(t) else t for t in ctx.outputs)
        return ctx.outputs.detach()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        store = ctx.runner.activations
        ctx.runner.begin_layer_backward(ctx.index)
        try:
            # This layer's tensors first (those the previous backward's prefetch had no room for), then the next
            # layer's (backward goes in reverse), so their reads overlap this backward.
            store.prefetch(ctx.group)
            store.prefetch(store.before(ctx.group))
            backward_through(ctx.outputs, grad_outputs)
        finally:
            ctx.outputs = None  # the graph goes, and with it autograd's references to the unpacked tensors
            store.release(ctx.group)
            ctx.runner.end_layer_backward(ctx.index)
        return input_grads(ctx, len(ctx.args))
