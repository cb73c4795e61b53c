"""`finetune export`: a checkpoint (or a run's latest one) as a clean Hugging Face model or peft adapter directory.

A full fine-tuning checkpoint holds the fp32 master weights as safetensors next to the optimizer state; a LoRA
checkpoint holds the peft adapter (adapter_config.json + adapter_model.safetensors) instead, and no base. Export
copies out the model or adapter (weights cast to the requested dtype) and the tokenizer, and leaves the
optimizer state behind. `--merge` writes the base with the adapter merged in, a model that needs no peft
(`offload.merge_adapter`). Tensors stream one at a time through the engine's shard writer, so a model larger
than RAM exports in constant memory. The output directory appears only when it is complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..offload import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKSUMS_FILE,
    ENGINE_STATE_FILE,
    OPTIMIZER_PREFIX,
    ChecksumMismatch,
    atomic_directory,
    index_ranges,
    merge_adapter,
    safetensors_index,
    swap_references,
    verify_checksums,
    write_model_config,
    write_safetensors_shards,
)
from .checkpoints import MANIFEST, RUN_CONFIG, Checkpoints
from .errors import FinetuneError, one_line
from .model import resolve_model

__all__ = ["export_checkpoint", "find_checkpoint", "is_adapter"]

ADAPTER_PREFIX = ADAPTER_WEIGHTS.removesuffix(".safetensors")  # peft reads one adapter_model.safetensors, never shards

_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
_ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_NEVER_COPIED = (ENGINE_STATE_FILE, RUN_CONFIG, CHECKSUMS_FILE)  # training state and its record, not part of a model


def find_checkpoint(source: Path) -> Path:
    """`source` if it is a checkpoint, model or adapter directory, else the latest checkpoint of the run in
    `source`.

    Raises:
        FinetuneError: none of those.
    """
    if (source / "checkpoints" / MANIFEST).exists():
        checkpoints = Checkpoints(source)
        return checkpoints.path(checkpoints.latest())
    if is_adapter(source) or (source / ENGINE_STATE_FILE).exists() or (source / "config.json").exists() and (
        (source / "model.safetensors").exists() or (source / "model.safetensors.index.json").exists()
    ):
        return source
    raise FinetuneError(
        f"{source} is not a run directory (with checkpoints/{MANIFEST}) nor a checkpoint, model or adapter directory "
        f"(config.json + model.safetensors, or {' + '.join(_ADAPTER_FILES)}); pass one of those"
    )


def is_adapter(checkpoint: Path) -> bool:
    """A LoRA run's checkpoint (or any peft adapter directory): the adapter, no base weights."""
    return all((checkpoint / name).is_file() for name in _ADAPTER_FILES)


def export_checkpoint(source: Path, out: Path, dtype: torch.dtype | None = None, *, merge: bool = False,
                      base: Path | None = None, max_shard_size: int = 2 << 30) -> Path:
    """Write the model or adapter of `source` (see `find_checkpoint`) to the new directory `out`.

    Args:
        dtype: dtype of the floating-point weights written; None: float32 (the master weights), or with `merge`
            the base model's stored dtype.
        merge: for an adapter, write the base model with the adapter merged in instead of the adapter.
        base: the base model for `merge`; default: the `model` of the run's run-config.yaml.

    Raises:
        FinetuneError: `source` is not a checkpoint, `out` exists and is not empty, `merge` of a checkpoint that
            is not an adapter, no usable base model, or an adapter that does not fit the base.
    """
    checkpoint = find_checkpoint(source)
    in_swap = swap_references(checkpoint)
    if in_swap is not None:
        raise FinetuneError(
            f"checkpoint {checkpoint} keeps its state in the run's swap files ({in_swap['area']}), not as a model; "
            "export the run's final checkpoint once it finishes (finetune run --resume --output RUN), or train with "
            "--portable-checkpoints"
        )
    if (checkpoint / CHECKSUMS_FILE).exists():  # a checkpoint (a plain model directory has no record)
        try:
            verify_checksums(checkpoint)
        except ChecksumMismatch as error:
            raise FinetuneError(f"checkpoint {checkpoint} is damaged: {error}; export an earlier checkpoint of the "
                                "run (pass its directory)") from None
    if merge and not is_adapter(checkpoint):
        raise FinetuneError(
            f"--merge: {checkpoint} holds a whole model, not a LoRA adapter, so there is nothing to merge; export it "
            "without --merge"
        )
    base_dir = _base_model(checkpoint, base) if merge else None
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise FinetuneError(f"export directory {out} exists and is not empty; choose a new directory")
        out.rmdir()  # atomic_directory renames onto a free name
    master = dtype or torch.float32  # what a checkpoint holds: fp32 master weights or adapters
    with atomic_directory(out) as temporary:
        if base_dir is not None:
            _write_merged(base_dir, checkpoint, temporary, dtype, max_shard_size)
            _copy_other_files(checkpoint, temporary, skip=_ADAPTER_FILES)
        elif is_adapter(checkpoint):
            _write_tensors(checkpoint, temporary, master, prefix=ADAPTER_PREFIX, max_shard_size=None)
            _copy_other_files(checkpoint, temporary, skip=_ADAPTER_FILES[1:])  # adapter_config.json as it is
        else:
            _write_tensors(checkpoint, temporary, master, prefix="model", max_shard_size=max_shard_size)
            write_model_config(checkpoint, temporary, master)
            _copy_other_files(checkpoint, temporary, skip=_MODEL_FILES)
    return out


def _base_model(checkpoint: Path, base: Path | None) -> Path:
    """The base model directory to merge into: `base`, or the `model` the run's run-config.yaml names.

    Raises:
        FinetuneError: neither is a usable model directory; the message names --base.
    """
    if base is not None:
        if not base.is_dir():
            raise FinetuneError(f"--base {base} is not a directory; pass the base model's directory (config.json + "
                                "safetensors), the MODEL the run trained")
        try:
            return resolve_model(str(base))
        except FinetuneError as error:
            raise FinetuneError(f"--base: {error}") from None
    run_config = checkpoint / RUN_CONFIG
    saved = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    if not isinstance(saved, dict) or not saved.get("model"):
        raise FinetuneError(
            f"--merge: {checkpoint} has no {RUN_CONFIG} naming its base model; pass the base model directory with "
            "--base PATH"
        )
    try:
        return resolve_model(str(saved["model"]), trust_remote_code=bool(saved.get("trust_remote_code")))
    except FinetuneError as error:
        raise FinetuneError(
            f"--merge: the run's base model {saved['model']} (from {run_config}) cannot be used ({error}); pass the "
            "base model directory with --base PATH"
        ) from None


def _write_merged(base: Path, adapter: Path, directory: Path, dtype: torch.dtype | None, max_shard_size: int) -> None:
    """The merged model's files, written straight into `directory` (the export's temporary directory)."""
    merged = directory / "merged"  # merge_adapter wants a new directory of its own
    try:
        merge_adapter(base, adapter, merged, dtype=dtype, max_shard_size=max_shard_size)
    except ValueError as error:  # an adapter that is not plain LoRA, or not for this base
        raise FinetuneError(f"--merge: {one_line(str(error))}") from None
    for file in merged.iterdir():
        file.rename(directory / file.name)
    merged.rmdir()


def _write_tensors(checkpoint: Path, directory: Path, dtype: torch.dtype, *, prefix: str,
                   max_shard_size: int | None) -> None:
    """Copy the `prefix` safetensors of `checkpoint`, floats cast to `dtype`, one tensor in memory at a time
    (max_shard_size None: one file, however large)."""
    index = safetensors_index(checkpoint, prefix)
    specs = [(name, tensor.shape, dtype if tensor.dtype.is_floating_point else tensor.dtype)
             for name, tensor in index_ranges(index).items()]
    one_file = sum(shape.numel() * kind.itemsize for _, shape, kind in specs) + 1
    write_safetensors_shards(directory, specs, _stream(index, specs), max_shard_bytes=max_shard_size or one_file,
                             prefix=prefix)


def _copy_other_files(checkpoint: Path, directory: Path, *, skip: tuple[str, ...]) -> None:
    """Tokenizer files, generation config, adapter config: every file of `checkpoint` but its weights (written by
    the caller), the `skip` files, and the training state (optimizer shards, engine state, run config)."""
    for file in checkpoint.iterdir():
        if not file.is_file() or file.name in skip or file.name in _NEVER_COPIED:
            continue
        if file.name.startswith((OPTIMIZER_PREFIX, "model-")):  # optimizer state; weight shards (rewritten)
            continue
        shutil.copy2(file, directory / file.name)


def _stream(index: dict[str, Path],
            specs: list[tuple[str, torch.Size, torch.dtype]]) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor in memory at a time, in `specs` order, cast on the way."""
    for name, _, dtype in specs:
        with safe_open(index[name], framework="pt") as tensors:
            yield name, tensors.get_tensor(name).to(dtype)
