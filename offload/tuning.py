"""The engine's knobs, chosen by the cost model: the prefetch depth, and how one memory total is split between the
device and host tiers.

Both change what a step costs in ways a fixed rule cannot see. A deeper prefetch hides more of a block's load
behind the compute before it, but takes device room, and a prefetched block pushes a cached one out (more disk
reads). On a CPU the two tiers are the same RAM: a device chunk evicted clean moves down to the host tier when
it has room (store.py), so the host tier is the cache between forward and backward and of the optimizer's state,
and the split decides how much of the total caches and how much is room for prefetch. `choose_settings` asks
`predict` for each candidate and keeps the fastest; where the model sees no difference it keeps the one that
reads least from disk, then the shallower prefetch, then the split listed first (the even split), so a choice is
never a guess the model cannot back.

The search is in two rounds, to keep a plan of a large model to a few seconds (each prediction replays the
step's chunk traffic): the depths at the given split, then the splits at the chosen depth (as deep as each split
has room for).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .block_layout import block_layouts
from .blocks import find_blocks
from .cost_model import Machine, Prediction, Workload, predict
from .floors import floors
from .load_stall import prefetch_bytes, prefetch_fits

__all__ = ["DEPTHS", "SPLITS", "Settings", "choose_settings"]

DEPTHS = (1, 2, 3, 4)
"""Prefetch depths tried: beyond 4 blocks, a load has the compute of 4 blocks to hide behind, and more depth only
takes room."""

SPLITS = (0.5, 0.25, 0.75, 1.0)
"""Shares of the memory above both floors given to the device tier, tried when one total is split (0.5 first: the
even split `finetune run --memory` made before, kept on a tie). A split that leaves the device just room for the
chosen depth, the rest to the host cache, is tried beside them."""


@dataclass(frozen=True)
class Settings:
    """The chosen knobs and the prediction they give."""

    prefetch: int
    device_budget: int
    host_budget: int
    prediction: Prediction
    tried: int  # predictions made to choose


def _better(a: Settings, b: Settings) -> bool:
    """Whether `a` beats `b`: a shorter step; on a tie (within float noise), fewer disk bytes read, then a shallower
    prefetch. Equal on all three: the one found first stays."""
    if abs(a.prediction.step_s - b.prediction.step_s) > 1e-9 * max(a.prediction.step_s, b.prediction.step_s):
        return a.prediction.step_s < b.prediction.step_s
    return (a.prediction.traffic.disk_read, a.prefetch) < (b.prediction.traffic.disk_read, b.prefetch)


def choose_settings(model: nn.Module, optimizer: Any, workload: Workload, machine: Machine, *, device_budget: int,
                    host_budget: int, nvme: bool, compute_dtype: torch.dtype, prefetch: int | None = None,
                    split: bool = False) -> Settings:
    """The prefetch depth (and with `split`, the device/host split) with the least predicted step time.

    Args:
        model, optimizer, workload, machine, nvme, compute_dtype: as `predict` takes them (`workload.prefetch` is
            replaced by each candidate).
        device_budget, host_budget: the tiers' budgets; with `split`, their sum is the total to divide, each tier
            at least its floor.
        prefetch: a depth the user gave: kept as it is (only the split is chosen).
        split: divide the total between the tiers (a CPU run given one total, such as `finetune run --memory`).

    Depths tried are those of `DEPTHS` the device budget has room for beside its floor (at least 1: a prefetch
    without room is dropped by the store and costs nothing).
    """
    plan = find_blocks(model)
    layouts = block_layouts(model, plan, workload.quantize_frozen, compute_dtype)
    need = floors(layouts, plan, optimizer, compute_dtype, workload.accumulation_steps)
    block = prefetch_bytes(layouts, compute_dtype, workload.holds_per_pass)
    tried = 0

    def settings(depth: int, device: int, host: int) -> Settings:
        nonlocal tried
        tried += 1
        prediction = predict(model, optimizer, dataclasses.replace(workload, prefetch=depth), machine,
                             device_budget=device, host_budget=host, nvme=nvme, compute_dtype=compute_dtype)
        return Settings(depth, device, host, prediction, tried)

    room = prefetch_fits(device_budget, need.device, block)
    depths = [prefetch] if prefetch is not None else [d for d in DEPTHS if d <= room] or [DEPTHS[0]]
    best = settings(depths[0], device_budget, host_budget)
    for depth in depths[1:]:
        candidate = settings(depth, device_budget, host_budget)
        best = candidate if _better(candidate, best) else best
    if not split:
        return dataclasses.replace(best, tried=tried)
    total = device_budget + host_budget
    spare = max(total - need.device - need.host, 0)
    devices = [need.device + int(share * spare) for share in SPLITS]
    devices.append(min(need.device + best.prefetch * block, need.device + spare))  # the rest cached in host
    for device in dict.fromkeys(devices):
        if device == best.device_budget:
            continue
        fits = prefetch_fits(device, need.device, block)
        depth = prefetch if prefetch is not None else max(min(best.prefetch, fits), 1)
        candidate = settings(depth, device, total - device)
        best = candidate if _better(candidate, best) else best
    return dataclasses.replace(best, tried=tried)
