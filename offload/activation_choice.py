"""activations="auto": offload a layer's saved tensors or recompute the layer, whichever the rates say costs less
(activation_mode.py names the modes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activation_mode import ActivationMode
from .cost_model import Machine, Workload, activation_bytes, step_flops
from .rates import measure_machine

__all__ = ["AUTO_TOKENS", "offload_pays", "resolve"]

AUTO_TOKENS = 2048
"""Tokens per micro-batch the compute rate is measured at for "auto" without a `Machine` (the choice itself does
not depend on the batch, but a matrix product's achieved rate does, a little)."""


def offload_pays(model: nn.Module, machine: Machine, compute_dtype: torch.dtype) -> bool:
    """Whether offloading the layers' saved tensors beats recomputing the layers, per token, at `machine`'s rates.

    Per token, a layer's saved bytes B (the cost model's estimate, `activation_bytes`) are written and read back:
    on CPU at the disk's rates, I/O time `io = B/write + B/read`; on CUDA through pinned host memory,
    `io = 2B/host_to_device`. That I/O runs beside the layer's forward and backward (compute time `c`), and on a
    CPU it also slows the compute by the share the disk takes (`1 - io_overlap`). Recomputing costs the layer's
    forward once more (`f`). Offload when its stall is the smaller: `max(0, io - c) + (1 - overlap) io < f`.
    Both sides grow with the tokens alike, so the answer does not depend on the batch."""
    token = Workload(batch_size=1, seq_len=1, recompute=False)
    layers = max(_text_config(model).num_hidden_layers, 1)
    saved = activation_bytes(model, token, compute_dtype, False)["activations"] / layers
    flops = step_flops(model, token, False)[0] / layers  # forward and backward
    again = step_flops(model, dataclasses.replace(token, recompute=True), False)[0] / layers - flops
    compute, forward = flops / machine.flops, again / machine.flops
    if machine.cuda:
        io, contention = 2 * saved / machine.host_to_device, 0.0
    else:
        io = saved / machine.disk_write + saved / machine.disk_read
        contention = (1.0 - machine.io_overlap) * io
    return max(0.0, io - compute) + contention < forward


def resolve(mode: ActivationMode, model: nn.Module, machine: Machine | None, compute_dtype: torch.dtype,
            nvme: str | Path | None, device: torch.device) -> ActivationMode:
    """"auto" made "offload" or "recompute" (`offload_pays`, at `machine`'s rates or this machine's, measured
    once and cached: `rates.measure_machine`); any other mode as it is. Without a swap directory "auto" recomputes.
    Call it while `model`'s parameters still have their shapes (before the engine binds them to its chunks)."""
    if mode is not ActivationMode.AUTO:
        return mode
    if nvme is None:
        return ActivationMode.RECOMPUTE
    if machine is None:
        config = _text_config(model)
        hidden = config.hidden_size
        shape = (AUTO_TOKENS, hidden, getattr(config, "intermediate_size", None) or 4 * hidden)
        machine = measure_machine(Path(nvme), compute_dtype, shape, device=device)
    return ActivationMode.OFFLOAD if offload_pays(model, machine, compute_dtype) else ActivationMode.RECOMPUTE


def _text_config(model: nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
