"""Merge a peft LoRA adapter into its base model's safetensors, streamed: one base tensor in memory at a time.

peft's `merge_and_unload()` needs the whole base model in memory. Here each base tensor is read from its file,
has the adapter's update added (`W + scaling * B @ A`, in fp32) and is handed to the shard writer before the
next one is read, so a model larger than RAM merges in the memory of its largest tensors (two: the one being
written and the next) plus the adapter's few small ones. Everything the adapter asks for is checked against the
base's file headers before a byte is written, and the output directory appears only when it is complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .durable import atomic_directory
from .model_export import write_model_config
from .safetensors_io import DTYPE_NAMES, UnsupportedDtype, index_ranges, safetensors_index, write_safetensors_shards
from .weights import stored_name

__all__ = ["merge_adapter"]


# Dtypes safetensors_io reads that merge_adapter refuses: 8- and 16-bit integer weights are a quantized base's
# (bitsandbytes' LLM.int8 stores int8), to which a float update cannot be added
_QUANTIZED = (torch.int8, torch.int16)
_IN_MEMORY = "merge it in memory with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload())"
# adapter_config.json fields that, when set, make the merge something other than W + scaling * B @ A
_UNSUPPORTED = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)
# Inits that leave the base weights as they are. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA train against a changed
# base (peft converts them to plain LoRA on save when asked); MiCA is a variant with its own merge.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class _Edit:
    """What the adapter does to one base tensor (adapter keys): replace it, then add a low-rank update."""

    replace: str | None = None  # bias="all"/"lora_only" biases, modules_to_save: the adapter's tensor instead
    lora_b: str | None = None  # lora_B.weight (out, r), or lora_B.bias (out,) of lora_bias=True
    lora_a: str | None = None  # lora_A.weight (r, in); None for a lora_B.bias
    scaling: float = 0.0
    transpose: bool = False  # the base stores the weight (in, out): GPT-2's Conv1D


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 2 << 30,
) -> Path:
    """Write `base` with the LoRA `adapter` merged in to the new model directory `out`, one tensor at a time.

    The result equals peft's `merge_and_unload()` + `save_pretrained` (the same tensor names, so tied weights
    stay tied), without ever holding the model: a model larger than RAM merges in the memory of its largest
    tensors. Each update is computed in fp32 and cast once, to `dtype`.

    Args:
        base: a Hugging Face model directory: config.json + model.safetensors or a sharded index.
        adapter: a peft LoRA adapter directory as `save_pretrained` writes it (adapter_config.json +
            adapter_model.safetensors).
        out: the output directory; it must not exist or be empty, and appears only when complete.
        dtype: floating-point dtype to write; None keeps each base tensor's stored dtype.
        max_shard_size: bytes per output safetensors shard.

    Returns:
        `out`.

    Raises:
        ValueError: a file is missing (in `base` or `adapter`), `out` is not empty, `dtype` is not a float, the
            adapter is not plain LoRA or not for this base (a target the base lacks, a shape that differs).
            Raised before anything is written.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if dtype is not None and not (dtype.is_floating_point and dtype in DTYPE_NAMES):
        raise ValueError(f"dtype={dtype} is not a float merge_adapter writes; pass torch.bfloat16, float16 or float32")
    _check_output(out)
    config = _adapter_config(adapter)
    stored, index = _base_tensors(base)
    with safe_open(adapter / ADAPTER_WEIGHTS, framework="pt") as weights:
        edits = _plan(weights, config, stored, base)
    specs = [(name, shape, dtype if dtype is not None and kept.is_floating_point else kept)
             for name, (shape, kept) in stored.items()]
    if out.exists():
        out.rmdir()  # empty (checked above); atomic_directory renames onto a free name
    with atomic_directory(out) as temporary:
        tensors = _merged_tensors(index, specs, edits, adapter / ADAPTER_WEIGHTS)
        write_safetensors_shards(temporary, specs, tensors, max_shard_bytes=max_shard_size)
        write_model_config(base, temporary, dtype or next(kept for _, _, kept in specs if kept.is_floating_point))
        if (base / "generation_config.json").exists():
            shutil.copy2(base / "generation_config.json", temporary / "generation_config.json")
    return out


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} exists and is not empty; choose a new directory or remove it")


def _adapter_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json, refused unless it describes plain LoRA (whose merge is W + scaling * B @ A)."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter / name).exists():
            raise ValueError(
                f"{adapter} has no {name}; pass a directory written by PeftModel.save_pretrained(path) "
                "(with safe_serialization=True)"
            )
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter} holds a {config.get('peft_type')} adapter, not LoRA; {_IN_MEMORY}")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise ValueError(f"{adapter} sets {field}={config[field]!r}, which merge_adapter cannot do; {_IN_MEMORY}")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(
            f"{adapter} sets init_lora_weights={config['init_lora_weights']!r}, trained against a changed base; "
            "save it as plain LoRA with save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )
    return config


def _base_tensors(base: Path) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], dict[str, Path]]:
    """The base model's tensors: name -> (shape, dtype), and name -> file, both in the index's order."""
    if not (base / "config.json").exists():
        raise ValueError(f"{base} has no config.json; pass a Hugging Face model directory as the base")
    try:
        index = safetensors_index(base)
    except FileNotFoundError as error:  # one error type for every bad input, as callers catch it
        raise ValueError(str(error)) from None
    return _stored(index), index


def _stored(index: dict[str, Path]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Each base tensor's shape and dtype, in `index` order, from the file headers (no tensor is read)."""
    try:
        ranges = index_ranges(index)
    except UnsupportedDtype as error:
        raise _unquantized_only(error.path, error.name, error.dtype) from None
    for name, tensor in ranges.items():
        if tensor.dtype in _QUANTIZED:
            raise _unquantized_only(tensor.path, name, DTYPE_NAMES[tensor.dtype])
    return {name: (tensor.shape, tensor.dtype) for name, tensor in ranges.items()}


def _unquantized_only(path: Path, name: str, dtype: str) -> ValueError:
    return ValueError(
        f"{path} stores {name} as {dtype}, which merge_adapter does not write; merge into an unquantized base"
    )


def _plan(weights: Any, config: dict[str, Any], stored: dict[str, tuple[torch.Size, torch.dtype]],
          base: Path) -> dict[str, _Edit]:
    """Base tensor name -> what the adapter's tensors (`weights`, an open safe_open) do to it, every key and
    shape checked against the base."""
    keys = set(weights.keys())
    edits: dict[str, _Edit] = {}
    for key in sorted(keys):
        module, _, kind = key.rpartition(".lora_")
        if kind in ("A.weight", "B.weight") and not {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= keys:
            raise ValueError(f"adapter has {key} without its lora_A/lora_B pair; re-save the adapter with peft")
        if kind == "A.weight":
            continue
        if kind in ("B.weight", "B.bias"):
            target = _target(f"{module}.{kind[2:]}", key, stored, base)
            edit = edits.setdefault(target, _Edit())
            edit.lora_b, edit.lora_a = key, (f"{module}.lora_A.weight" if kind == "B.weight" else None)
            _check_update(edit, target, weights, config, stored[target][0], base)
        elif any(part.startswith(("lora_", "trainable_tokens")) for part in key.split(".")):
            raise ValueError(
                f"adapter tensor {key} is not plain LoRA (DoRA, embedding LoRA, trainable tokens); {_IN_MEMORY}"
            )
        else:
            target = _target(key, key, stored, base)
            edits.setdefault(target, _Edit()).replace = key
            _check_shape(key, torch.Size(weights.get_slice(key).get_shape()), target, stored[target][0], base)
    return edits


def _target(name: str, key: str, stored: dict[str, Any], base: Path) -> str:
    """The base tensor that adapter tensor `key` (for parameter `name`, in the peft model) changes: its name
    without peft's wrapping, or without the LM class's first component too, as a checkpoint saved from the bare
    model (GPT-2's on the hub: `h.0...` for `transformer.h.0...`) stores it."""
    plain = stored_name(name)
    for candidate in (plain, plain.partition(".")[2]):
        if candidate in stored:
            return candidate
    raise ValueError(f"adapter tensor {key} changes {plain}, which {base} does not hold; is the adapter for this base?")


def _check_update(edit: _Edit, target: str, weights: Any, config: dict[str, Any], shape: torch.Size,
                  base: Path) -> None:
    """Set the edit's scaling and orientation, checking lora_B (and lora_A) against `shape`, the base tensor's."""
    b_shape = torch.Size(weights.get_slice(edit.lora_b).get_shape())
    module = stored_name(edit.lora_b.rpartition(".lora_B.")[0])  # as peft names it for rank_pattern
    if edit.lora_a is None:  # lora_bias: lora_B.bias (out,) is added to the base bias
        _check_shape(edit.lora_b, b_shape, target, shape, base)
        edit.scaling = _scaling(config, module, rank=None)
        return
    a_shape = torch.Size(weights.get_slice(edit.lora_a).get_shape())
    if a_shape[0] != b_shape[1]:
        raise ValueError(
            f"adapter's {edit.lora_a} {tuple(a_shape)} and {edit.lora_b} {tuple(b_shape)} disagree on the rank; "
            "re-save the adapter with peft"
        )
    edit.scaling = _scaling(config, module, rank=a_shape[0])
    delta = torch.Size((b_shape[0], a_shape[1]))  # (out, in), as nn.Linear stores its weight
    flipped = torch.Size((a_shape[1], b_shape[0]))  # (in, out), as GPT-2's Conv1D does
    if shape != flipped:
        _check_shape(edit.lora_b, delta, target, shape, base)
    # peft transposes by module type (Conv1D); the shape says the same, except for a square weight, where
    # adapter_config.json's fan_in_fan_out decides (peft sets it to True when it meets a Conv1D)
    edit.transpose = shape == flipped and (shape != delta or bool(config.get("fan_in_fan_out")))


def _check_shape(key: str, got: torch.Size, name: str, expected: torch.Size, base: Path) -> None:
    if got != expected:
        raise ValueError(
            f"adapter tensor {key} gives {name} shape {tuple(got)} but {base} stores {tuple(expected)}; "
            "is the adapter for this base?"
        )


def _scaling(config: dict[str, Any], module: str, rank: int | None) -> float:
    """peft's scaling for `module` (name in the base model): lora_alpha / r, or / sqrt(r) with use_rslora, with
    r and alpha from rank_pattern / alpha_pattern where a key matches."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if rank is not None and rank != r:
        raise ValueError(
            f"adapter_config.json gives {module} rank {r} but its lora_A has rank {rank}; "
            "use the adapter_config.json saved with these weights"
        )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches `module`, as peft matches them (peft.utils.other.
    get_pattern_key): a regex that matches the whole name or its end after a dot."""
    return next((value for key, value in patterns.items() if re.match(rf"(.*\.)?({key})$", module)), default)


def _merged_tensors(index: dict[str, Path], specs: list[tuple[str, torch.Size, torch.dtype]],
                    edits: dict[str, _Edit], adapter: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each output tensor in `specs` order: read, merged, cast. The shard writer writes each one before it asks
    for the next, so only the current base tensor is held here (the files stay open, memory-mapped: reading one
    copies only its bytes)."""
    with ExitStack() as stack:
        weights = stack.enter_context(safe_open(adapter, framework="pt"))
        files = {path: stack.enter_context(safe_open(path, framework="pt")) for path in dict.fromkeys(index.values())}
        for name, _, dtype in specs:
            yield name, _merge(files[index[name]].get_tensor(name), edits.get(name), weights).to(dtype)


def _merge(tensor: torch.Tensor, edit: _Edit | None, weights: Any) -> torch.Tensor:
    """`tensor` with the edit applied: replaced, then `+ scaling * B @ A` (transposed for Conv1D) in fp32."""
    if edit is None:
        return tensor
    if edit.replace is not None:
        tensor = weights.get_tensor(edit.replace)
    if edit.lora_b is None:
        return tensor
    update = weights.get_tensor(edit.lora_b).float()
    if edit.lora_a is not None:
        update = update @ weights.get_tensor(edit.lora_a).float()  # (out, r) @ (r, in) -> (out, in)
    return tensor.float() + (update.T if edit.transpose else update) * edit.scaling
