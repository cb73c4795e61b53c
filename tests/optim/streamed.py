"""Helpers for the optimizer tests: flat chunks from named tensors, and tiny models trained two ways.

`train_streamed` runs the engine with every state chunk forced through NVMe (budget = the engine's minimum, as in
tests/offload/test_engine.py); `train_in_memory` runs the same batches on the same weights with a plain
torch.optim.Optimizer (a reference package's, or ours through `optim.InMemory`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tiny_models import random_batch
from torch import nn
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.optim.base import ChunkOptimizer
from finetune.optim.layout import ChunkLayout


def flatten(tensors: dict[str, torch.Tensor], layout: ChunkLayout) -> torch.Tensor:
    """One flat fp32 chunk holding `tensors` at their slots, zero padding between them."""
    flat = torch.zeros(layout.numel)
    for slot in layout.slots:
        slot.view(flat).copy_(tensors[slot.name])
    return flat


def zero_state(optimizer: ChunkOptimizer, layout: ChunkLayout) -> dict[str, torch.Tensor]:
    """The state chunks of one block before the first step, as the engine creates them."""
    return {name: torch.zeros(spec.numel, dtype=spec.dtype) for name, spec in optimizer.state_specs(layout).items()}


def batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=2, seq=16, generator=generator) for _ in range(count)]


def train_streamed(
    path: Path, optimizer: ChunkOptimizer, data: list[dict], swap: Path, out: Path, *, checkpoint: Path | None = None
) -> offload.Engine:
    """Train through the engine at its minimum budget (all state through NVMe), export to `out` (and save a
    checkpoint, state chunks included, to `checkpoint`); returns the closed engine for its stats."""
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, optimizer)
    engine = offload.Engine(model, optimizer, offload.Budget(device=device, host=host, nvme=swap))
    for batch in data:
        engine.train_step(batch)
    engine.export(out)
    if checkpoint is not None:
        engine.save_checkpoint(checkpoint, portable=True)  # read back as safetensors by the tests
    engine.close()
    return engine


def train_in_memory(path: Path, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], data: list[dict]):
    """The same training in memory; returns (model, optimizer)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = make_optimizer(model)
    for batch in data:
        optimizer.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
    return model, optimizer


def max_difference(exported: Path, reference: nn.Module) -> float:
    """Largest absolute difference between an exported model's parameters and `reference`'s."""
    expected = dict(reference.named_parameters())
    loaded = AutoModelForCausalLM.from_pretrained(exported)
    return max((p - expected[name]).abs().max().item() for name, p in loaded.named_parameters())


def block_layouts(model: nn.Module) -> dict[str, ChunkLayout]:
    """Each engine block's layout by block name, with embeddings marked as the engine marks them."""
    embeddings = optim.embedding_names(model)
    return {
        block.name: ChunkLayout.from_shapes({n: p.shape for n, p in block.params.items()}, embeddings)
        for block in offload.find_blocks(model).blocks
    }
