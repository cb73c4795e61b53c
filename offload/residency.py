"""Residency: which blocks are held on the compute device, and the parameters pointed at them while they are.

Holding a block acquires its weight chunks in the device tier (waiting for their prefetch) and points its
parameters' `.data` at views of them; releasing it points them back at empty placeholders and lets the store
evict the chunks. Holds are counted, so a block used by two modules (a tied head) stays until both release it.
The forward hooks here hold the blocks a module needs just before it runs, prefetch the next ones and release
them after; the first-order and zeroth-order steps build on `hold`, `release` and `prefetch`.

Threads: everything here runs on the compute thread, except `in_host`, which the optimizer worker does not use
(it acquires host chunks from the store itself).

Note [Saved weight views]: autograd saves views of weights for backward (a matmul saves its weight). Those views
would keep a chunk's buffer alive outside the budget, and once the store hands that buffer to another chunk they
would read that chunk's bytes. `saved_weights` packs each saved view of a held weight chunk as (block, role,
offset, shape, stride) and re-makes it at backward from the buffer the block is held in then.

Note [Compute copies]: a chunk stored in another form than the compute dtype is not what the parameters view. A
QLoRA layer's frozen chunk holds NF4 codes; MeZO weights may be stored in bf16 while MeZO computes in fp32. Holding
such a block decodes the chunk into a compute-dtype buffer, `BlockState.dequantized`, that the parameters (and
`weight_view`, and saved views) use until the last release; its room is kept outside the store's device budget
(`block_layout.compute_copies_nbytes`). A write to the chunk while the block is held (MeZO's lazy update) is
followed by `refresh`, so the copy never goes stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..optim.layout import ChunkLayout
from .block_state import BlockState, Bound, placeholder
from .chunks import Chunk, Tier
from .store import ChunkStore
from .timers import Timers

__all__ = ["DEFAULT_PREFETCH", "ForwardObserver", "Residency", "tensors_of"]

DEFAULT_PREFETCH = 2  # blocks loaded ahead; `offload.choose_settings` picks one for a model, budget and machine

ForwardObserver = Callable[[tuple[int, ...], nn.Module, Any, Any], None]
"""Called with (blocks, module, args, output) after a module that needs `blocks` ran forward, before they are
released."""


class Residency:
    """Holds blocks on the compute device for the modules that run, within the store's device budget.

    Args:
        blocks: every block's state, in model order.
        store: where the chunks live.
        compute_dtype, device: of the placeholders parameters point at while not held.
        prefetch_depth: how many blocks ahead a forward starts loading.
        timers: receives "load wait", the seconds the compute thread waits for chunk loads prefetch did not hide.
    """

    def __init__(
        self,
        blocks: list[BlockState],
        store: ChunkStore,
        compute_dtype: torch.dtype,
        device: torch.device,
        prefetch_depth: int,
        timers: Timers,
    ) -> None:
        self.blocks, self.store = blocks, store
        self.compute_dtype, self.device = compute_dtype, device
        self.prefetch_depth = prefetch_depth
        self.timers = timers
        self.observers: list[ForwardObserver] = []
        self.prefetch_grads = False  # set by the first-order step while it runs: forward also loads kept gradients
        self._held_storage: dict[int, tuple[int, str]] = {}  # storage address of a held weight buffer -> (block, role)
        self._slot_of: dict[int, tuple[int, int]] | None = None  # id(Parameter) -> (block, slot), once bound

    # ------------------------------------------------------------------------------------ hold and release

    def hold(self, index: int, *, grads: bool = False) -> None:
        """Make block `index`'s weights (and with `grads`, its gradient chunk) resident and bind its parameters."""
        state = self.blocks[index]
        for role, chunk, layout, bound in _weight_parts(state):
            flat = self._acquire(chunk)
            if state.holds == 0:
                if self._decoded(state, role):  # Note [Compute copies]
                    state.dequantized = flat = self._decode(state, role, flat)
                views = layout.views(flat)
                for p, slot in bound:
                    p.data = views[slot]
                self._held_storage[flat.untyped_storage().data_ptr()] = (index, role)
        state.holds += 1
        if grads:
            flat = self._acquire(state.grads)
            if state.grad_holds == 0:
                views = state.layout.views(flat)
                for p, slot in state.bound():
                    p.grad = views[slot]  # autograd accumulates into the chunk in place
            state.grad_holds += 1

    def release(self, index: int, *, grads: bool = False) -> None:
        """Undo one `hold`; the last release unbinds the parameters (the gradient chunk is released dirty)."""
        state = self.blocks[index]
        if grads:
            state.grad_holds -= 1
            if state.grad_holds == 0:
                for p, _ in state.bound():
                    p.grad = None
            self.store.release(state.grads, Tier.DEVICE, dirty=True)
        state.holds -= 1
        for role, chunk, _, bound in _weight_parts(state):
            if state.holds == 0:
                for p, _ in bound:
                    p.data = placeholder(self.compute_dtype, self.device)
                del self._held_storage[self._compute_flat(state, role).untyped_storage().data_ptr()]
            self.store.release(chunk, Tier.DEVICE)  # never dirty: compute does not write the weights
        if state.holds == 0:
            state.dequantized = None

    def prefetch(self, indices: range, *, grads: bool = False) -> None:
        """Start loading the weight chunks of the blocks in `indices` (those that exist); with `grads`, also
        gradient chunks that hold accumulated gradients (a zero one needs no read)."""
        for index in indices:
            if 0 <= index < len(self.blocks):
                state = self.blocks[index]
                self.store.prefetch(state.weights, Tier.DEVICE)
                if state.frozen is not None:
                    self.store.prefetch(state.frozen, Tier.DEVICE)
                if grads and not state.grads.zero:
                    self.store.prefetch(state.grads, Tier.DEVICE)

    @contextmanager
    def in_host(self, chunk: Chunk, *, dirty: bool = False) -> Iterator[torch.Tensor]:
        """`chunk` held in host memory for the body of a with-statement (outside any training step)."""
        flat = self.store.acquire(chunk, Tier.HOST)
        try:
            yield flat
        finally:
            self.store.release(chunk, Tier.HOST, dirty=dirty)

    def slot_of(self, parameter: nn.Parameter) -> tuple[int, int]:
        """(block index, slot) of a Parameter object over a trainable chunk, tied twins included. Asked only once
        the parameters are bound (binding.bind_parameters makes new Parameter objects)."""
        if self._slot_of is None:
            self._slot_of = {id(p): (i, slot) for i, state in enumerate(self.blocks) for p, slot in state.bound()}
        return self._slot_of[id(parameter)]

    def weight_view(self, index: int, slot: int) -> torch.Tensor:
        """Slot `slot` of held block `index`'s weights, as the tensor its parameter views: Note [Compute copies]."""
        state = self.blocks[index]
        return state.layout.slots[slot].view(self._compute_flat(state, "weights"))

    def refresh(self, index: int) -> None:
        """Held block `index`'s weight chunk was just written: bring the copy its parameters view up to date (Note
        [Compute copies]); nothing to do where they view the chunk itself."""
        state = self.blocks[index]
        if state.holds and self._decoded(state, "weights"):
            state.dequantized.copy_(state.weights.typed(Tier.DEVICE))  # the exact bf16 -> fp32 upcast

    def dequantize(self, state: BlockState, codes: torch.Tensor) -> torch.Tensor:
        """The frozen weights of a quantized block in the compute dtype, next to its held codes."""
        flat = torch.empty(state.frozen_layout.numel, dtype=self.compute_dtype, device=codes.device)
        state.quantized.dequantize_into(codes, flat)
        return flat

    def _acquire(self, chunk: Chunk) -> torch.Tensor:
        start = time.perf_counter()
        flat = self.store.acquire(chunk, Tier.DEVICE)
        self.timers.add("load wait", time.perf_counter() - start)
        return flat

    def _decoded(self, state: BlockState, role: str) -> bool:
        """Whether the parameters of `role` view a compute copy rather than the chunk: Note [Compute copies]."""
        if role == "frozen":
            return state.quantized is not None
        return state.weights.dtype != self.compute_dtype

    def _decode(self, state: BlockState, role: str, flat: torch.Tensor) -> torch.Tensor:
        """The compute copy of a held chunk: NF4 codes dequantized, or bf16 weights upcast (exactly)."""
        if state.dequantized is not None:
            raise RuntimeError(f"{state.block.name} has two chunks stored apart from compute; this is a bug")
        if role == "frozen":
            return self.dequantize(state, flat)
        return flat.to(self.compute_dtype)

    def _compute_flat(self, state: BlockState, role: str) -> torch.Tensor:
        """The held buffer the parameters of `role` view: the chunk's, or its compute copy (Note [Compute copies])."""
        if self._decoded(state, role):
            return state.dequantized
        return getattr(state, role).typed(Tier.DEVICE)

    # ---------------------------------------------------------------------------------------- forward hooks

    def before_forward(self, blocks: tuple[int, ...], module: nn.Module, args: Any) -> None:
        """Forward pre-hook: hold what the module needs, and start loading the blocks after it."""
        for index in blocks:
            self.hold(index)
        self.prefetch(range(blocks[-1] + 1, blocks[-1] + 1 + self.prefetch_depth), grads=self.prefetch_grads)

    def after_forward(self, blocks: tuple[int, ...], module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: tell the observers (the first-order step hooks the outer blocks' backward), release."""
        for observe in self.observers:
            observe(blocks, module, args, output)
        for index in blocks:
            self.release(index)

    # ---------------------------------------------------------------------------------- saved weight views

    def saved_weights(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Autograd hooks that keep saved views of held weights as references: Note [Saved weight views]."""

        def pack(tensor: torch.Tensor) -> Any:
            held = self._held_storage.get(tensor.untyped_storage().data_ptr())
            if held is None:
                return tensor
            index, role = held
            flat = self._compute_flat(self.blocks[index], role)
            if tensor.dtype != flat.dtype:
                return tensor
            return index, role, tensor.storage_offset() - flat.storage_offset(), tensor.shape, tensor.stride()

        def unpack(packed: Any) -> torch.Tensor:
            if torch.is_tensor(packed):
                return packed
            index, role, offset, shape, stride = packed
            chunk = getattr(self.blocks[index], role)
            if not chunk.pinned(Tier.DEVICE):
                raise RuntimeError(f"backward needs the weights of {chunk.key}, which are not held; this is a bug")
            flat = self._compute_flat(self.blocks[index], role)
            return flat.as_strided(shape, stride, flat.storage_offset() + offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _weight_parts(state: BlockState) -> list[tuple[str, Chunk, ChunkLayout, Bound]]:
    """(role, chunk, layout, bound parameters) of the weight chunks a forward needs: trained, then frozen."""
    parts = [("weights", state.weights, state.layout, state.bound())]
    if state.frozen is not None:
        parts.append(("frozen", state.frozen, state.frozen_layout, state.frozen_bound()))
    return parts


def tensors_of(output: Any) -> list[torch.Tensor]:
    """Every tensor in a module's output (nested tuples and lists)."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []
