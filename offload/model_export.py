"""The trained model out of the chunks: a Hugging Face model directory, or a peft adapter directory.

Weights stream from the chunks one block at a time (fp32 masters where they exist), so exporting a model larger
than RAM needs no more memory than training it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..optim.layout import ChunkLayout
from .binding import InHost
from .block_state import BlockState
from .blocks import BlockPlan
from .checkpoint import ADAPTER_WEIGHTS
from .chunks import Chunk
from .residency import Residency
from .safetensors_io import write_safetensors_shards

__all__ = ["adapter_tensors", "export_model", "is_peft", "save_adapter", "write_model_config"]


def export_model(
    path: Path, model: nn.Module, plan: BlockPlan, residency: Residency, dtype: torch.dtype, max_shard_size: int
) -> Path:
    """Write `model`'s config and every weight (cast to `dtype`) and buffer as safetensors shards in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    buffers = {
        name: buffer
        for name, buffer in model.state_dict(keep_vars=True).items()
        if not isinstance(buffer, nn.Parameter) and name not in plan.aliases
    }
    blocks = residency.blocks
    specs = [(slot.name, slot.shape, dtype) for state in blocks for layout, _ in _parts(state) for slot in layout.slots]
    specs += [(name, buffer.shape, buffer.dtype) for name, buffer in buffers.items()]
    write_safetensors_shards(path, specs, _weights(residency, dtype, buffers), max_shard_bytes=max_shard_size)
    model.config.save_pretrained(path)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    return path


def _weights(residency: Residency, dtype: torch.dtype, buffers: dict[str, torch.Tensor]) -> Iterator[tuple]:
    """(name, tensor) in `export_model`'s spec order, one block's chunk in host memory at a time."""
    for state in residency.blocks:
        for layout, chunk in _parts(state):
            with residency.in_host(chunk) as flat:
                if chunk is state.frozen and state.quantized is not None:  # the weights the model computes with
                    flat = residency.dequantize(state, flat)
                for slot in layout.slots:
                    yield slot.name, slot.view(flat).to(dtype)
    yield from buffers.items()


def _parts(state: BlockState) -> list[tuple[ChunkLayout, Chunk]]:
    parts = [(state.layout, state.master or state.weights)]
    if state.frozen is not None:
        parts.append((state.frozen_layout, state.frozen))
    return parts


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is wrapped by peft (its trainable parameters are adapters)."""
    return bool(getattr(model, "peft_config", None))


def save_adapter(path: Path, model: nn.Module, blocks: list[BlockState], in_host: InHost) -> Path:
    """Write the trained adapter of a peft-wrapped model as `PeftModel.save_pretrained` does
    (adapter_config.json + adapter_model.safetensors, fp32), from the chunks.

    Raises:
        ValueError: the model is not a peft model.
    """
    if not is_peft(model):
        raise ValueError(
            "save_adapter needs a peft model (peft.get_peft_model(model, config)); use export for a whole model"
        )
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for state in blocks:
        if not state.trainable:
            continue
        with in_host(state.master or state.weights) as flat:
            for slot in state.layout.slots:
                tensors[_adapter_key(model, slot.name)] = slot.view(flat).to(torch.float32).clone()
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.peft_config[model.active_adapter].save_pretrained(path)
    return path


def adapter_tensors(model: nn.Module, directory: Path, names: list[str]) -> list[torch.Tensor]:
    """The adapter weights `save_adapter` wrote to `directory`, for the parameters `names`."""
    with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as file:
        return [file.get_tensor(_adapter_key(model, name)) for name in names]


def _adapter_key(model: nn.Module, name: str) -> str:
    """peft's saved keys drop the adapter name: ...lora_A.default.weight -> ...lora_A.weight"""
    return name.replace(f".{model.active_adapter}.", ".")


def write_model_config(source: Path, directory: Path, dtype: torch.dtype) -> None:
    """Copy `source`'s config.json into `directory` with its dtype set to `dtype`, the written weights' dtype:
    transformers loads `dtype="auto"` by it (for `merge_adapter` and `finetune export`, which copy tensors)."""
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the older name of the same field
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
