"""Budget floors: the least device and host memory a model's blocks can stream through, and the whole state.

The engine refuses at construction, with these numbers, a budget it could only fail with mid-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..optim.base import ChunkOptimizer
from ..optim.layout import chunk_nbytes
from ..optim.mezo import MeZO
from .block_layout import BlockLayout, block_layouts, chunk_specs, compute_copies_nbytes
from .blocks import BlockPlan, find_blocks
from .budget import detect_hardware
from .sizes import format_bytes
from .updates import QUEUED

__all__ = ["Floors", "check_budget", "floors", "model_floors"]


@dataclass(frozen=True)
class Floors:
    """Bytes below which a tier cannot hold what one step needs at once, and of the whole training state."""

    device: int
    host: int
    largest_layer: str  # the block (or blocks held together) whose working set sets the device floor, for messages
    state: int  # weights, gradients, masters, optimizer state and frozen weights, padded as chunks
    frozen_in_files: int = 0  # of `state`, frozen weights that a model directory's safetensors hold (not swapped)
    grads: int = 0  # of `state`, the gradient chunks (not swapped when each is consumed inside backward)
    grads_waiting: int = 0  # the most gradient bytes waiting for their updates at once (updates.QUEUED)
    updated: int = 0  # of `state`, the chunks an update writes (weights, masters, optimizer states)


def floors(
    layouts: list[BlockLayout], plan: BlockPlan, optimizer: ChunkOptimizer | MeZO, compute_dtype: torch.dtype,
    accumulation_steps: int = 1,
) -> Floors:
    """The floors of a model's blocks.

    Device: the one block that computes at a time (with its gradients, first-order): the largest layer, or the
    head's side (the blocks the modules after the layers need, held together in its backward: a tied head holds
    the embedding block), or the embedding; outer_holds.py releases each outer block after its own backward.
    A tied head's block is held beside the layers under gradient accumulation, and through MeZO's step. MeZO's
    perturbed copies of one module's weights are temporaries, like activations. Host: one block's whole update
    (weights, gradients, states) at once, or its frozen weights chunk (staged through host memory on CUDA). Frozen
    parameters have only that chunk: no gradients, masters or states. A quantized block computes with its NF4
    chunk and, while held, the dequantized weights; MeZO weights stored in bf16 likewise with their fp32 copy.
    """
    frozen, compute, update, grads = {}, {}, {}, []
    for b in layouts:
        name = b.block.name
        frozen[name] = b.quantized.nbytes if b.quantized else b.frozen.nbytes(compute_dtype) if b.frozen else 0
        chunks = {role: chunk_nbytes(spec.numel, spec.dtype)
                  for role, spec in chunk_specs(b.trainable, compute_dtype, optimizer).items()}
        held = chunks["weights"] + chunks.get("grads", 0)  # gradients unless zeroth-order
        compute[name] = held + frozen[name]
        update[name] = sum(chunks.values())
        grads.append(chunks.get("grads", 0))
    largest = max((b.block.name for b in layouts if b.block.is_layer), key=compute.__getitem__)
    outer = [b.block.name for b in layouts if not b.block.is_layer]
    working_sets = {name: compute[name] for name in [largest, *outer]}
    embedding_side, head_side = ([layouts[i].block.name for i in side] for side in plan.outer_sides())
    working_sets[" + ".join(head_side)] = sum(compute[name] for name in head_side)
    if isinstance(optimizer, MeZO) or accumulation_steps > 1:
        # MeZO holds a block both sides use (a tied head's) through the step; first-order, a tied weight kept as
        # one Parameter (binding.bind_parameters, under accumulation) accumulates only after the embedding's
        # backward, so its block stays held through every layer's.
        for name in [name for name in head_side if name in embedding_side]:
            working_sets[f"{name} + {largest}"] = compute[name] + compute[largest]
    setter = max(working_sets, key=working_sets.__getitem__)
    copies = compute_copies_nbytes(layouts, plan, optimizer, compute_dtype)  # room the engine keeps aside
    host = max(max(update.values()), max(frozen.values()))
    in_files = sum(b.frozen.nbytes(compute_dtype) for b in layouts if b.frozen is not None and not b.quantized)
    return Floors(working_sets[setter] + copies, host, setter, sum(update.values()) + sum(frozen.values()), in_files,
                  grads=sum(grads), grads_waiting=sum(sorted(grads)[-(QUEUED + 2):]),
                  updated=sum(update.values()) - sum(grads))


def model_floors(
    model: nn.Module, optimizer: ChunkOptimizer | MeZO, compute_dtype: torch.dtype, quantize_frozen: str | None,
    accumulation_steps: int = 1,
) -> Floors:
    """The floors of `model` (on the meta device or not), without building an engine."""
    plan = find_blocks(model)
    layouts = block_layouts(model, plan, quantize_frozen, compute_dtype)
    return floors(layouts, plan, optimizer, compute_dtype, accumulation_steps)


def check_budget(
    need: Floors, device_bytes: int, host_bytes: int, nvme: Path | None, *, frozen_in_files: bool = False,
    grads_in_swap: bool = True, speculative: bool = False,
) -> None:
    """Refuse now, with the numbers, rather than fail mid-step. `frozen_in_files`: the frozen weights are read
    from the model's safetensors (a model directory), so they are dropped, never swapped, when memory is short.
    `grads_in_swap` False: updates run inside backward and nothing accumulates (`clipping.updates_in_backward`,
    one micro-batch), so each gradient chunk is consumed by its block's update right after the block's backward
    and discarded: the disk check counts only those that may wait for their updates at once. `speculative`: exact
    clipping's updates run in backward and may be rolled back (updates.py, Note [Speculative updates]): until the
    step is validated each chunk an update wrote keeps its previous version in the swap files too, so they can grow
    by `need.updated` more (no memory: the kept bytes live only in the files).

    Raises:
        ValueError: every problem found, each with the value to raise or the directory to change.
    """
    problems = []
    if device_bytes < need.device:
        problems.append(
            f"Budget.device={format_bytes(device_bytes)} is below the minimum {format_bytes(need.device)} "
            f"(what computes at once at the most: {need.largest_layer}, with its gradients); raise it to at least "
            f"{format_bytes(need.device)}"
        )
    if host_bytes < need.host:
        problems.append(
            f"Budget.host={format_bytes(host_bytes)} is below the minimum {format_bytes(need.host)} "
            f"(one block's weights, gradients and optimizer state at once); raise it to at least "
            f"{format_bytes(need.host)}"
        )
    in_memory = device_bytes + host_bytes
    swapped = need.state - (need.frozen_in_files if frozen_in_files else 0)  # what may have to go to swap files
    if nvme is None and in_memory < swapped:
        problems.append(
            f"the training state needs {format_bytes(swapped)} but Budget.device + Budget.host is "
            f"{format_bytes(in_memory)} and no NVMe directory was given; set Budget.nvme "
            f"to a directory on a fast disk, or raise the budgets"
        )
    # What the swap files can grow to. A consumed gradient spills only while it waits for its update (at most
    # updates.QUEUED of them wait, beside the one updating and the one just finished), and its file is removed
    # once it is used.
    written = swapped - (0 if grads_in_swap else need.grads - need.grads_waiting)
    if speculative:  # every chunk an update writes has its bytes in a file then, the kept version beside the newest
        written = (written if in_memory < written else need.updated) + need.updated
    if nvme is not None and (speculative or in_memory < written):
        free = detect_hardware().disk_free(nvme)
        if free < written:
            which = "every chunk of the training state" if grads_in_swap else "every chunk but the gradients"
            if speculative:
                which += (", and a kept version of each chunk an update writes (exact clipping's rollback: "
                          "clip_mode='per-block' keeps none)")
            problems.append(
                f"Budget.nvme={nvme} has {format_bytes(free)} free but the swap files can grow to "
                f"{format_bytes(written)} ({which} may be evicted); free space there "
                "or choose a directory on a disk with more room"
            )
    if problems:
        raise ValueError("; ".join(problems))
