"""An engine's checkpoint: what a resumed run needs, written into a new directory atomically, and read back.

Two kinds. A checkpoint **in swap** (the default with a swap directory) copies no state: the engine flushes what is
only in memory to the swap files and commits their current versions (chunk_files.py), and the directory holds only
`engine_state.pt`, whose `swap` entry names the swap directory and, for every chunk, its version file and that
file's checksum. Those versions are never overwritten while the checkpoint is kept, so it lives with the swap files
and needs them. A **portable** checkpoint copies everything and stands alone: a Hugging Face model directory of the
fp32 master weights (so it can be exported or loaded as a model), or, for a peft model whose base is read from its
files, the peft adapter directory (the base is not copied); plus the optimizer's state chunks
(`optimizer*.safetensors`).

Both hold `engine_state.pt` (format version, step, optimizer name and state outside the chunks, a fingerprint of
every tensor and chunk shape, and the caller's `extra`) and `checksums.json`, a hash of every other file, which a
load verifies before it parses anything (checksums.py); a resume from swap also checks each version file against
its checksum before adopting it. The directory is written with `durable.atomic_directory`: under a temporary name
next to its final place, every file and the directory fsynced, and only then renamed, so a crash or a full disk at
any point leaves the previous checkpoints as they were and at most a `.partial` directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .binding import InHost
from .block_state import BlockState
from .checksums import ChecksumMismatch, checksum_file, verify_checksums, write_checksums
from .chunks import Chunk
from .durable import atomic_directory
from .safetensors_io import safetensors_index, write_safetensors_shards

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ENGINE_STATE_FILE",
    "FORMAT_VERSION",
    "OPTIMIZER_PREFIX",
    "SWAP_ENTRY",
    "fingerprint",
    "read_engine_state",
    "restore_states",
    "swap_references",
    "verify_version",
    "write_checkpoint",
    "write_swap_checkpoint",
]

ENGINE_STATE_FILE = "engine_state.pt"
# The files of a peft adapter directory (PeftModel.save_pretrained): its LoraConfig and its weights.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_PREFIX = "optimizer"
FORMAT_VERSION = 1
SWAP_ENTRY = "swap"  # engine_state.pt of a checkpoint in swap: {"area": swap directory, "chunks": {key: ref}}


def fingerprint(blocks: list[BlockState], quantize_frozen: str | None) -> list[tuple]:
    """What must match between a checkpoint and an engine: every tensor's name and shape, every state chunk's size
    and dtype, and the storage of frozen weights."""
    layouts = [state.layout for state in blocks] + [state.frozen_layout for state in blocks if state.frozen_layout]
    tensors = [(slot.name, tuple(slot.shape)) for layout in layouts for slot in layout.slots]
    chunks = [
        (f"{state.block.name}/{name}", chunk.numel, str(chunk.dtype))
        for state in blocks
        for name, chunk in state.states.items()
    ]
    return tensors + chunks + [("quantize_frozen", str(quantize_frozen))]


def write_checkpoint(
    directory: Path,
    write_model: Callable[[Path], Any],
    blocks: list[BlockState],
    in_host: InHost,
    engine_state: dict[str, Any],
) -> Path:
    """Write the model (by `write_model`), the state chunks and `engine_state` into the new `directory`.

    Nothing is visible under `directory` until all of it is on disk; the previous checkpoints are never touched.

    Raises:
        FileExistsError: `directory` exists.
        ValueError: `engine_state` holds something `torch.load(weights_only=True)` cannot read back.
    """
    states = [(f"{state.block.name}/{name}", chunk) for state in blocks for name, chunk in state.states.items()]
    with atomic_directory(directory) as temporary:
        write_model(temporary)
        write_safetensors_shards(
            temporary,
            [(key, torch.Size([chunk.numel]), chunk.dtype) for key, chunk in states],
            _state_stream(states, in_host),
            max_shard_bytes=2 << 30,
            prefix=OPTIMIZER_PREFIX,
        )
        _write_engine_state(temporary, engine_state)
    return directory


def write_swap_checkpoint(directory: Path, engine_state: dict[str, Any]) -> Path:
    """Write checkpoint `directory` of state committed in swap files: `engine_state` (with its `SWAP_ENTRY`) and
    its checksum, atomically.

    Raises:
        FileExistsError: `directory` exists.
        ValueError: `engine_state` holds something `torch.load(weights_only=True)` cannot read back.
    """
    with atomic_directory(directory) as temporary:
        _write_engine_state(temporary, engine_state)
    return directory


def _write_engine_state(temporary: Path, engine_state: dict[str, Any]) -> None:
    """`engine_state.pt`, checked to load back, and then `checksums.json` of every file in `temporary`."""
    torch.save({"format": FORMAT_VERSION, **engine_state}, temporary / ENGINE_STATE_FILE)
    try:  # refuse now what load_checkpoint could not read back
        torch.load(temporary / ENGINE_STATE_FILE, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"save_checkpoint: extra holds something torch.load(weights_only=True) cannot read "
            f"({str(error).splitlines()[0]}); keep to dicts, lists, numbers, strings and tensors"
        ) from None
    write_checksums(temporary, [str(p.relative_to(temporary)) for p in temporary.rglob("*") if p.is_file()])


def _state_stream(states: list[tuple[str, Chunk]], in_host: InHost) -> Iterator[tuple[str, torch.Tensor]]:
    for key, chunk in states:
        with in_host(chunk) as flat:
            yield key, flat


def read_engine_state(directory: Path, *, optimizer: str, expected: list[tuple]) -> dict[str, Any]:
    """The engine state of checkpoint `directory`, checked against this engine's optimizer and `fingerprint`.

    Raises:
        ChecksumMismatch: a file of the checkpoint is damaged (every one is verified here, before any is read).
        ValueError: not a checkpoint, another format version, another optimizer, or another model.
    """
    if not (directory / ENGINE_STATE_FILE).is_file():
        raise ValueError(
            f"{directory} is not a checkpoint (no {ENGINE_STATE_FILE}); pass a directory written by save_checkpoint"
        )
    verify_checksums(directory)
    state = torch.load(directory / ENGINE_STATE_FILE, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory} has format {state.get('format')!r}, and this version of finetune reads format "
            f"{FORMAT_VERSION}; resume it with the finetune version that wrote it"
        )
    if state["optimizer"] != optimizer:
        raise ValueError(
            f"checkpoint {directory} was trained with {state['optimizer']}, not {optimizer}; "
            f"resume with the same optimizer"
        )
    if state["chunks"] != expected:
        raise ValueError(
            f"checkpoint {directory} belongs to a different model (its tensors or state shapes differ); "
            "resume with the model and optimizer settings it was trained with"
        )
    return state


def swap_references(directory: Path) -> dict[str, Any] | None:
    """The `SWAP_ENTRY` of checkpoint `directory` if it is a checkpoint in swap whose files verify, else None
    (portable, or damaged: a load then says which file is)."""
    try:
        verify_checksums(directory)
        state = torch.load(directory / ENGINE_STATE_FILE, weights_only=True)
    except (OSError, ValueError, RuntimeError):
        return None
    return state.get(SWAP_ENTRY) if isinstance(state, dict) else None


def verify_version(path: Path, expected: str, key: str, checkpoint: Path) -> None:
    """Check a swap version a checkpoint references before a resume adopts it.

    Raises:
        ChecksumMismatch: the file is missing or its bytes changed since the checkpoint; the message names the
            file, the chunk and the checkpoint.
    """
    if not path.is_file():
        raise ChecksumMismatch(path, f"(chunk {key}), which checkpoint {checkpoint} needs, is gone: it lives with "
                               "the swap files, which were removed")
    if checksum_file(path) != expected:
        raise ChecksumMismatch(path, f"(chunk {key}) does not match the checksum checkpoint {checkpoint} saved of it "
                               "(its bytes changed on the disk)")


def restore_states(directory: Path, blocks: list[BlockState], in_host: InHost) -> None:
    """Copy every state chunk back from checkpoint `directory`."""
    index = safetensors_index(directory, OPTIMIZER_PREFIX)
    for state in blocks:
        for name, chunk in state.states.items():
            key = f"{state.block.name}/{name}"
            with safe_open(index[key], framework="pt") as file:
                saved = file.get_tensor(key)
            with in_host(chunk, dirty=True) as flat:
                flat.copy_(saved)
