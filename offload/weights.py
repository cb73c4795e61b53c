"""Where a block's initial weights come from: the module itself, or a model directory's safetensors files.

Reading from the files one block at a time is what lets a model larger than RAM be loaded at all: the module
is built on the meta device (no memory) and only the current block's tensors are ever materialised.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .blocks import Block
from .safetensors_io import safetensors_index

__all__ = ["find_stored", "load_block_weights", "stored_name"]


def load_block_weights(
    block: Block, aliases: dict[str, str], directory: str | Path | None, names: list[str] | None = None
) -> Iterator[torch.Tensor]:
    """The block's tensors (or those of `names`) in its parameter order (CPU, the stored dtype; the caller casts
    on copy), read one at a time as they are asked for: a 13B layer's tensors together are 0.6 GB beside the
    budget, the largest alone a fifth of it. A parameter of a peft-wrapped model is found under its base model's
    name; one the directory does not hold but the module does (a new adapter on a pretrained base) comes from the
    module."""
    names = list(block.params) if names is None else names
    if directory is None:
        on_meta = [name for name in names if block.params[name].is_meta]
        if on_meta:
            raise ValueError(
                f"parameter {on_meta[0]} is on the meta device and no weights were given; "
                "use Engine.from_pretrained(path, ...) or pass weights=<model directory>"
            )
        yield from (block.params[name].detach() for name in names)
        return
    index = safetensors_index(Path(directory))
    for name in names:
        stored = find_stored(name, aliases, index)
        if stored is None:
            if not block.params[name].is_meta and block.params[name].requires_grad:
                yield block.params[name].detach()
                continue
            raise KeyError(f"{directory} has no tensor {name}; is it the checkpoint of this model?")
        with safe_open(index[stored], framework="pt") as file:
            tensor = file.get_tensor(stored)
        yield tensor


def find_stored(name: str, aliases: dict[str, str], index: dict[str, Path]) -> str | None:
    """The key `index` holds parameter `name` under: itself, its peft base name, or a tied alias; None if absent."""
    twins = [alias for alias, owner in aliases.items() if owner == name]
    candidates = [name, stored_name(name)] + [key for alias in twins for key in (alias, stored_name(alias))]
    return next((key for key in candidates if key in index), None)


def stored_name(name: str) -> str:
    """The checkpoint key of a parameter of a peft-wrapped model: `base_model.model.` and `.base_layer` dropped."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")
