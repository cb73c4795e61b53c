"""What a run's options mean for the engine: its optimizer, compute dtype and frozen-base quantization. `run` and
the planner (`plan`, `run --dry-run`) both build from these, so they count the same state."""

from __future__ import annotations

import torch

from .. import optim
from ..offload import default_compute_dtype
from .config import Dtype, OptimizerName, RunConfig, StorageDtype
from .optimizer_args import optimizer_class, optimizer_kwargs

__all__ = ["compute_dtype", "make_optimizer", "quantize_frozen"]

_DTYPES = {Dtype.AUTO: None, Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16, Dtype.FLOAT16: torch.float16}


def make_optimizer(config: RunConfig) -> optim.ChunkOptimizer | optim.MeZO:
    """The optimizer --optimizer names, with --lr and --weight-decay (and MeZO's --seed and --storage-dtype) and the
    settings of --optimizer-args: the run's and the planner's, so both count the same state."""
    settings = optimizer_kwargs(config.optimizer.value, config.optimizer_args)
    if config.optimizer is OptimizerName.MEZO:
        storage = torch.bfloat16 if config.storage_dtype is StorageDtype.BF16 else torch.float32
        return optim.MeZO(lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, storage_dtype=storage,
                          **settings)
    return optimizer_class(config.optimizer.value)(lr=config.lr, weight_decay=config.weight_decay, **settings)


def quantize_frozen(config: RunConfig) -> str | None:
    """--qlora: the frozen base stored as NF4 (blockwise 4-bit), dequantized as each layer computes."""
    return "nf4" if config.qlora else None


def compute_dtype(config: RunConfig, device: torch.device | None = None) -> torch.dtype:
    """--dtype, or the default for `device` (this machine's; the planner passes a hardware profile's)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = default_compute_dtype(device, zeroth_order=config.optimizer is OptimizerName.MEZO)
    return _DTYPES[config.dtype] or default
