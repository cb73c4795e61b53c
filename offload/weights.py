"""Where a block's initial weights come from: the module itself, or a model directory's safetensors files.

Reading from the files one block at a time is what lets a model larger than RAM be loaded at all: the module
is built on the meta device (no memory) and only the current block's tensors are ever materialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from offload.blocks import Block

__all__ = ["load_block_weights", "safetensors_index"]


def safetensors_index(directory: Path, prefix: str = "model") -> dict[str, Path]:
    """Tensor name -> file, from `model.safetensors.index.json` or the single `model.safetensors`."""
    index = directory / f"{prefix}.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / f"{prefix}.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"{directory} has no model.safetensors or model.safetensors.index.json; "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    with safe_open(single, framework="pt") as file:
        return {name: single for name in file.keys()}


def load_block_weights(block: Block, aliases: dict[str, str], directory: str | Path | None) -> list[torch.Tensor]:
    """The block's tensors in its parameter order (CPU, the stored dtype; the caller casts on copy)."""
    if directory is None:
        on_meta = [name for name, p in block.params.items() if p.is_meta]
        if on_meta:
            raise ValueError(
                f"parameter {on_meta[0]} is on the meta device and no weights were given; "
                "use Engine.from_pretrained(path, ...) or pass weights=<model directory>"
            )
        return [p.detach() for p in block.params.values()]
    index = safetensors_index(Path(directory))
    also_known_as = {owner: alias for alias, owner in aliases.items()}
    tensors = []
    for name in block.params:
        stored = name if name in index else also_known_as.get(name)
        if stored not in index:
            raise KeyError(f"{directory} has no tensor {name}; is it the checkpoint of this model?")
        with safe_open(index[stored], framework="pt") as file:
            tensors.append(file.get_tensor(stored))
    return tensors
