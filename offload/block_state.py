"""One block's chunks and the parameters that view them: creating the chunks, filling them, binding the module.

After construction the module owns no parameter memory: every Parameter is an empty placeholder, and while its
block is held (residency.py) its `.data` is a view into the block's weight chunk. A tied weight's other use (the
head) gets a Parameter object of its own over the same slot, its "twin" (see `bind_parameters`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..optim.base import ChunkOptimizer
from ..optim.layout import ChunkLayout, chunk_nbytes
from ..optim.mezo import MeZO
from .block_layout import BlockLayout, chunk_specs
from .blocks import Block, BlockPlan
from .chunks import Chunk
from .frozen import SafetensorsSource, tensor_ranges
from .quantized import QuantizedLayout
from .store import ChunkStore
from .timers import Timers

__all__ = ["BlockState", "Bound", "block_states", "placeholder"]

Bound = list[tuple[nn.Parameter, int]]
"""Parameter objects over a chunk, each with the index of the layout slot it views."""


@dataclass
class BlockState:
    """One block's chunks and the parameters over them. Public for introspection (`Engine.blocks`): read it,
    do not change it.

    Threads: `holds`, `grad_holds` and `dequantized` belong to the compute thread. `norms` is shared: the compute
    thread writes it when the block's gradient is final, before it submits the block's update (the submit is the
    hand-off); the optimizer worker reads it and clears it at the end of that update (see updates.py).
    """

    block: Block
    layout: ChunkLayout  # trainable tensors
    params: list[nn.Parameter]  # in slot order
    weights: Chunk
    master: Chunk | None  # fp32 masters, only when compute is not fp32
    grads: Chunk | None  # None for zeroth-order training
    states: dict[str, Chunk]  # the optimizer's, by name
    aliases: Bound = field(default_factory=list)  # tied twins of trainable parameters
    holds: int = 0
    grad_holds: int = 0
    norms: list[torch.Tensor] | None = None  # per-tensor gradient norms, for clipping (shared, see above)
    # Parameters with requires_grad=False (a peft model's base): one read-only weights chunk, nothing else.
    frozen_layout: ChunkLayout | None = None
    frozen_params: list[nn.Parameter] = field(default_factory=list)
    frozen_aliases: Bound = field(default_factory=list)
    frozen: Chunk | None = None
    # QLoRA: the frozen chunk holds NF4 codes in this layout. `dequantized`: while held, the compute-dtype copy of
    # the one chunk stored in another form (those codes, or MeZO weights stored in bf16): residency.py's
    # Note [Compute copies].
    quantized: QuantizedLayout | None = None
    dequantized: torch.Tensor | None = None

    @property
    def trainable(self) -> bool:
        """Whether the block has parameters to train (else its trainable chunks are empty and never used)."""
        return bool(self.layout.slots)

    def bound(self) -> Bound:
        """Every Parameter object that views this block's trainable chunks, with the slot it views."""
        return [(p, i) for i, p in enumerate(self.params)] + self.aliases

    def frozen_bound(self) -> Bound:
        """Every Parameter object that views the frozen chunk, with the slot it views."""
        return [(p, i) for i, p in enumerate(self.frozen_params)] + self.frozen_aliases

    def chunks(self) -> list[Chunk]:
        """Every chunk of the block."""
        trainable = [self.weights, self.master, self.grads, *self.states.values()]
        return [chunk for chunk in trainable + [self.frozen] if chunk is not None]


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What a parameter's `.data` is while its block is not held: no memory."""
    return torch.empty(0, dtype=dtype, device=device)


def block_states(
    layouts: list[BlockLayout],
    store: ChunkStore,
    optimizer: ChunkOptimizer | MeZO,
    compute_dtype: torch.dtype,
    *,
    plan: BlockPlan,
    weights: Path | None,
    reader: ThreadPoolExecutor,
    timers: Timers,
) -> list[BlockState]:
    """Each block's state with its chunks created in `store` (contents zero until filled).

    A frozen chunk of a model read from `weights` gets a `SafetensorsSource`, reading on `reader`: it is read
    from the model's own files and never written anywhere (its reads reported to `timers`). With a frozen base,
    what trains is adapters: small beside the base blocks streaming past, so their chunks are kept (evicted last).
    """
    adapters = any(b.frozen is not None for b in layouts)
    states = []
    for b in layouts:
        chunks = {
            role: store.create(f"{b.block.name}/{role}", spec.numel, spec.dtype, chunk_nbytes(spec.numel, spec.dtype),
                               keep=adapters)
            for role, spec in chunk_specs(b.trainable, compute_dtype, optimizer).items()
        }
        state = BlockState(
            b.block, b.trainable, [b.block.params[slot.name] for slot in b.trainable.slots],
            weights=chunks.pop("weights"), grads=chunks.pop("grads", None), master=chunks.pop("master", None),
            states=chunks, frozen_layout=b.frozen, quantized=b.quantized,
            frozen_params=[b.block.params[slot.name] for slot in b.frozen.slots] if b.frozen else [],
        )
        state.frozen = _frozen_chunk(b, store, compute_dtype, plan, weights, reader, timers)
        states.append(state)
    return states


def _frozen_chunk(
    b: BlockLayout,
    store: ChunkStore,
    compute_dtype: torch.dtype,
    plan: BlockPlan,
    weights: Path | None,
    reader: ThreadPoolExecutor,
    timers: Timers,
) -> Chunk | None:
    if b.frozen is None:
        return None
    key = f"{b.block.name}/frozen"
    if b.quantized is not None:  # quantized by `copy_weights_in`, then swapped like a trained chunk
        return store.create(key, b.quantized.nbytes, torch.uint8, b.quantized.nbytes)
    source = None  # without a model directory, the module's values are copied in (and may be swapped out once)
    if weights is not None:
        ranges = tensor_ranges([slot.name for slot in b.frozen.slots], plan.aliases, weights)
        source = SafetensorsSource(b.frozen, ranges, compute_dtype, store.backend, reader, timers)
    return store.create(key, b.frozen.numel, compute_dtype, b.frozen.nbytes(compute_dtype), source=source)
