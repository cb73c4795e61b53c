"""What prefetch cannot hide: the seconds a step's compute waits for block loads, at a given prefetch depth.

The engine asks for blocks i+1 .. i+k as it starts block i (residency.before_forward; in backward,
first_order.begin_layer_backward asks for i-1 .. i-k), so a block's load runs beside the compute of the k holds
before it, and what it takes beyond that the compute thread waits for (the "load wait" of `Timers`). Busy times
alone bound a step by the disk and by the cores; they miss a load that outlasts the compute ahead of it, which
stalls a step that is not disk-bound: the embedding and the head (a vocabulary's rows beside a layer's small
compute), or every block when nothing is prefetched (depth 0: each load waited for in full).

The model: one step's holds in the engine's order (forward by hook point; backward: the blocks after the layers,
the layers last first, the blocks before them), each with the bytes of its chunks and its FLOPs. The step's read
seconds are spread over the holds by their bytes, beside the update's own reads (masters and optimizer states,
which the optimizer worker waits for, not compute), and its compute seconds by FLOPs, but for the engine's fixed
cost per block, which every hold pays alike (the embedding's hold computes little, yet is not free). Hold h waits
max(0, load_h - compute of holds h-k .. h-1), around the step as a cycle: a step's first holds are prefetched as
the one before ends (first_order.py). Two loads in flight share the disk; this ignores their queueing, and the
disk's busy time, which bounds the step apart (cost_model), covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..optim.layout import chunk_nbytes
from .block_layout import BlockLayout, chunk_specs
from .blocks import BlockPlan

__all__ = ["Hold", "load_wait", "prefetch_bytes", "prefetch_fits", "step_holds", "update_reads"]


@dataclass(frozen=True)
class Hold:
    """One hold of blocks in a step: the bytes a load of its chunks reads, and the FLOPs it computes."""

    nbytes: float
    flops: float


def _block_bytes(layout: BlockLayout, compute_dtype: torch.dtype, file_ratio: float) -> float:
    """Bytes a hold of this block loads when none of it is resident: trained weights, and the frozen chunk as
    stored (NF4 codes for QLoRA; as its safetensors file holds it when read from one)."""
    nbytes = float(layout.trainable.nbytes(compute_dtype)) if layout.trainable.slots else 0.0
    if layout.quantized is not None:
        nbytes += layout.quantized.nbytes
    elif layout.frozen is not None:
        nbytes += layout.frozen.nbytes(compute_dtype) * file_ratio
    return nbytes


def step_holds(
    plan: BlockPlan,
    layouts: list[BlockLayout],
    compute_dtype: torch.dtype,
    *,
    layer_flops: float,
    head_flops: float,
    recompute: bool,
    zeroth_order: bool,
    accumulation_steps: int,
    file_ratio: float = 1.0,
) -> list[Hold]:
    """The holds of one optimizer step in the engine's order, with their bytes and FLOPs.

    Args:
        layer_flops, head_flops: the step's FLOPs in the decoder layers and in the output layer (`step_flops`).
        file_ratio: bytes of a frozen chunk's file per chunk byte (LoRA on a bf16 file with fp32 chunks: 0.5).

    A layer's backward costs its forward times (2 t + f) / (t + f), t and f its trained and frozen weights (a
    frozen weight needs only the input gradient), plus one forward more with recompute; the head's backward is
    twice its forward when trained, once when frozen."""
    points = [point.blocks for point in plan.hook_points]
    is_layer = [layouts[blocks[0]].block.is_layer for blocks in points]
    first, last = is_layer.index(True), len(is_layer) - 1 - is_layer[::-1].index(True)
    before, layers, after = points[:first], points[first : last + 1], points[last + 1 :]
    nbytes = [_block_bytes(b, compute_dtype, file_ratio) for b in layouts]

    def hold(blocks: tuple[int, ...], flops: float) -> Hold:
        return Hold(sum(nbytes[i] for i in blocks), flops)

    micro = 1 if zeroth_order else accumulation_steps
    per_layer = layer_flops / max(len(layers), 1) / micro
    head = head_flops / micro
    if zeroth_order:  # the outer blocks are held for the whole step, the layers once each (every pass)
        outer = tuple(i for blocks in before + after for i in blocks)
        return [hold(outer, 0.0)] + [hold(blocks, per_layer) for blocks in layers] + [Hold(0.0, head)]
    trained = sum(b.trainable.numel for b in layouts if b.block.is_layer)
    frozen = sum(b.frozen.numel for b in layouts if b.block.is_layer and b.frozen is not None)
    backward = (2 * trained + frozen) / max(trained + frozen, 1) + (1 if recompute else 0)
    head_backward = 2.0 if any(b.trainable.slots for b in layouts if not b.block.is_layer) else 1.0
    forward_share = per_layer / (1 + backward)
    head_share = head / (1 + head_backward)
    micro_batch = (
        [hold(blocks, 0.0) for blocks in before]
        + [hold(blocks, forward_share) for blocks in layers]
        + [hold(blocks, head_share) for blocks in after]
        + [hold(blocks, head_share * head_backward) for blocks in reversed(after)]
        + [hold(blocks, forward_share * backward) for blocks in reversed(layers)]
        + [hold(blocks, 0.0) for blocks in reversed(before)]
    )
    return micro_batch * micro


def prefetch_bytes(layouts: list[BlockLayout], compute_dtype: torch.dtype, accumulation_steps: int = 1) -> int:
    """Device bytes each block of prefetch depth takes beside the device floor (the outer blocks and one layer
    with its gradients, held at once in backward): the largest layer's prefetched chunks, its weights, frozen ones
    as stored, and its gradients once they accumulate across micro-batches."""
    largest = 0
    for b in layouts:
        if b.block.is_layer:
            trained = b.trainable.nbytes(compute_dtype) if b.trainable.slots else 0
            frozen = b.quantized.nbytes if b.quantized else b.frozen.nbytes(compute_dtype) if b.frozen else 0
            largest = max(largest, trained * (2 if accumulation_steps > 1 else 1) + frozen)
    return largest


def prefetch_fits(device_budget: int, floor: int, block_bytes: int) -> int:
    """How many blocks ahead a prefetch can load within `device_budget` (`block_bytes`: `prefetch_bytes`). A
    deeper prefetch finds no room and the store drops it, so those loads are waited for in full."""
    return max(device_budget - floor, 0) // block_bytes if block_bytes else 2**31


def update_reads(layouts: list[BlockLayout], optimizer: object, compute_dtype: torch.dtype) -> int:
    """Bytes an update reads beyond the weights a hold loads: masters and optimizer states (the worker's wait)."""
    total = 0
    for b in layouts:
        if b.trainable.slots:
            specs = chunk_specs(b.trainable, compute_dtype, optimizer).items()
            total += sum(chunk_nbytes(s.numel, s.dtype) for role, s in specs if role not in ("weights", "grads"))
    return total


def load_wait(holds: list[Hold], read_s: float, compute_s: float, other_bytes: float, depth: int,
              fixed_s: float = 0.0) -> float:
    """Seconds compute waits for loads in one step at prefetch `depth`.

    Args:
        holds: `step_holds`.
        read_s: the step's seconds of reads (disk; on CUDA the slower of disk and host-to-device link).
        compute_s: the step's compute seconds, `fixed_s` of them spread evenly over the holds, the rest by FLOPs.
        other_bytes: bytes read in the step that no hold waits for (`update_reads`).
    """
    total_bytes = sum(h.nbytes for h in holds) + other_bytes
    total_flops = sum(h.flops for h in holds)
    if not holds or total_bytes == 0 or read_s == 0:
        return 0.0
    loads = [read_s * h.nbytes / total_bytes for h in holds]
    fixed_s = min(fixed_s, compute_s) if total_flops else compute_s
    computes = [fixed_s / len(holds) + (compute_s - fixed_s) * (h.flops / total_flops if total_flops else 0.0)
                for h in holds]
    count, depth = len(holds), min(depth, len(holds) - 1)
    # Hold h's load was asked for as hold h - depth started (cyclically), so it ran beside those holds' compute.
    return sum(max(0.0, loads[h] - sum(computes[(h - i) % count] for i in range(1, depth + 1))) for h in range(count))
