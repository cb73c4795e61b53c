"""`finetune export`: a checkpoint (or a run's latest one) as a clean Hugging Face model directory.

A checkpoint already holds the fp32 master weights as safetensors next to the optimizer state. Export copies
out the model (config, weights cast to the requested dtype, generation config) and the tokenizer, and leaves
the optimizer state behind. Tensors stream one at a time through the engine's shard writer, so a model larger
than RAM exports in constant memory. The output directory appears only when it is complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from cli.checkpoints import MANIFEST, RUN_CONFIG, Checkpoints
from cli.errors import FinetuneError
from offload.checkpoint import ENGINE_STATE_FILE, OPTIMIZER_PREFIX, atomic_directory
from offload.export import SAFETENSORS_DTYPES, write_safetensors_shards
from offload.weights import safetensors_index

__all__ = ["export_checkpoint", "find_checkpoint"]

_FROM_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_REWRITTEN = ("config.json", "model.safetensors", "model.safetensors.index.json", ENGINE_STATE_FILE, RUN_CONFIG)


def find_checkpoint(source: Path) -> Path:
    """`source` if it is a checkpoint or model directory, else the latest checkpoint of the run in `source`.

    Raises:
        FinetuneError: neither.
    """
    if (source / "checkpoints" / MANIFEST).exists():
        checkpoints = Checkpoints(source)
        return checkpoints.path(checkpoints.latest())
    if (source / "config.json").exists() and (
        (source / "model.safetensors").exists() or (source / "model.safetensors.index.json").exists()
    ):
        return source
    raise FinetuneError(
        f"{source} is not a run directory (with checkpoints/{MANIFEST}) nor a checkpoint or model directory "
        "(config.json + model.safetensors); pass one of those"
    )


def export_checkpoint(source: Path, out: Path, dtype: torch.dtype = torch.float32, *,
                      max_shard_size: int = 2 << 30) -> Path:
    """Write the model of `source` (see `find_checkpoint`) to the new directory `out`, floats cast to `dtype`.

    Raises:
        FinetuneError: `source` is not a checkpoint, or `out` exists and is not empty.
    """
    checkpoint = find_checkpoint(source)
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise FinetuneError(f"export directory {out} exists and is not empty; choose a new directory")
        out.rmdir()  # atomic_directory renames onto a free name
    index = safetensors_index(checkpoint)
    specs = []
    for name, file in index.items():
        with safe_open(file, framework="pt") as tensors:
            piece = tensors.get_slice(name)
            stored = _FROM_SAFETENSORS[piece.get_dtype()]
            specs.append((name, torch.Size(piece.get_shape()), dtype if stored.is_floating_point else stored))
    with atomic_directory(out) as temporary:
        write_safetensors_shards(temporary, specs, _stream(index, specs), max_shard_bytes=max_shard_size)
        config = json.loads((checkpoint / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)  # the older name of the same field
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in checkpoint.iterdir():  # generation config, tokenizer files
            if file.is_file() and not file.name.startswith((OPTIMIZER_PREFIX, "model-")) and file.name not in _REWRITTEN:
                shutil.copy2(file, temporary / file.name)
    return out


def _stream(index: dict[str, Path], specs: list[tuple[str, torch.Size, torch.dtype]]) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor in memory at a time, in `specs` order, cast on the way."""
    for name, _, dtype in specs:
        with safe_open(index[name], framework="pt") as tensors:
            yield name, tensors.get_tensor(name).to(dtype)
