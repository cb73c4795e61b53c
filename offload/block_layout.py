"""What each block's chunks hold: the element layout of its trainable and frozen tensors, and its chunk roles.

Computed from the module tree alone (shapes, no weights), so the same code sizes the budget floors of a model
on the meta device before anything is allocated (`floors.py`) and creates the chunks of a real engine
(`block_state.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..optim.base import ChunkOptimizer, StateSpec
from ..optim.layout import ChunkLayout
from ..optim.mezo import MeZO
from ..optim.torch_adapter import embedding_names
from .blocks import Block, BlockPlan
from .quantized import QuantizedLayout, quantizable_weights

__all__ = ["BlockLayout", "block_layouts", "chunk_specs", "compute_copies_nbytes", "compute_copy_nbytes"]


@dataclass(frozen=True)
class BlockLayout:
    """One block's layouts: trainable tensors (with embedding weights marked), frozen tensors (None if it has
    none), and, for QLoRA, the NF4 byte layout its frozen chunk is stored in (None: stored in the compute dtype)."""

    block: Block
    trainable: ChunkLayout
    frozen: ChunkLayout | None
    quantized: QuantizedLayout | None


def block_layouts(
    model: nn.Module, plan: BlockPlan, quantize_frozen: str | None, compute_dtype: torch.dtype
) -> list[BlockLayout]:
    """Every block's layouts. Only the decoder layers' frozen nn.Linear weights are quantized: the embedding and
    head stay in the compute dtype, as in transformers' 4-bit loading."""
    embeddings = embedding_names(model)
    layouts = []
    for block in plan.blocks:
        trainable = {n: p.shape for n, p in block.params.items() if p.requires_grad}
        frozen_shapes = {n: p.shape for n, p in block.params.items() if not p.requires_grad}
        frozen = ChunkLayout.from_shapes(frozen_shapes) if frozen_shapes else None
        quantized = None
        if quantize_frozen is not None and frozen is not None and block.is_layer:
            names = quantizable_weights(model, [slot.name for slot in frozen.slots])
            quantized = QuantizedLayout(frozen, names, compute_dtype) if names else None
        layouts.append(BlockLayout(block, ChunkLayout.from_shapes(trainable, embeddings), frozen, quantized))
    return layouts


def chunk_specs(
    layout: ChunkLayout, compute_dtype: torch.dtype, optimizer: ChunkOptimizer | MeZO
) -> dict[str, StateSpec]:
    """The trainable chunks one block has: compute weights, gradients, fp32 masters if compute is not fp32, and
    the optimizer's states. Zeroth-order training has only the weights, in MeZO's `storage_dtype` (fp32, its
    compute dtype, or bf16: upcast while held, see `compute_copy_nbytes`)."""
    if isinstance(optimizer, MeZO):
        return {"weights": StateSpec(layout.numel, optimizer.storage_dtype)}
    specs = {"weights": StateSpec(layout.numel, compute_dtype), "grads": StateSpec(layout.numel, compute_dtype)}
    if compute_dtype != torch.float32:
        specs["master"] = StateSpec(layout.numel, torch.float32)
    states = optimizer.state_specs(layout)
    clash = sorted(set(states) & set(specs))
    if clash:
        raise ValueError(f"{type(optimizer).__name__}.state_specs uses reserved chunk names {clash}; rename them")
    specs.update(states)
    return specs


def compute_copy_nbytes(b: BlockLayout, optimizer: ChunkOptimizer | MeZO, compute_dtype: torch.dtype) -> int:
    """Bytes of the compute-dtype copy that a held block's parameters view instead of a chunk stored in another
    form: a QLoRA layer's dequantized frozen weights, or MeZO weights stored in bf16 and upcast to fp32 (0: the
    parameters view the chunks themselves). The copy lives beside the chunks, outside the store's budget."""
    if b.quantized is not None:
        return b.frozen.nbytes(compute_dtype)
    if isinstance(optimizer, MeZO) and optimizer.storage_dtype != compute_dtype:
        return b.trainable.nbytes(compute_dtype)
    return 0


def compute_copies_nbytes(
    layouts: list[BlockLayout], plan: BlockPlan, optimizer: ChunkOptimizer | MeZO, compute_dtype: torch.dtype
) -> int:
    """The most bytes of compute copies held at once, which the engine keeps out of the store's device budget:
    those of the blocks MeZO holds through its step (a block both ends of the model use: a tied embedding's), and
    the largest of the rest (held one at a time)."""
    copies = [compute_copy_nbytes(b, optimizer, compute_dtype) for b in layouts]
    before, after = plan.outer_sides()
    through = [i for i in before if i in after] if isinstance(optimizer, MeZO) else []
    return sum(copies[i] for i in through) + max((c for i, c in enumerate(copies) if i not in through), default=0)
