"""A Hugging Face model directory written from a stream of tensors, without holding the model in memory.

The shards come from `safetensors_io.write_safetensors_shards`; beside them goes the source model's config.json,
with its dtype set to what the shards hold, because transformers loads `dtype="auto"` by it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# engine.py imports the shard writer from here; it lives in safetensors_io.py now (drop this once engine.py
# imports it there)
from .safetensors_io import write_safetensors_shards  # noqa: F401

__all__ = ["write_model_config"]


def write_model_config(source: Path, directory: Path, dtype: torch.dtype) -> None:
    """Copy `source`'s config.json into `directory` with its dtype set to `dtype`, the written weights' dtype."""
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the older name of the same field
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
