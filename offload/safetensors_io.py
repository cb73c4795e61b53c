"""The safetensors format, both ways: dtype names, file headers, a model directory's index, streamed shards.

A `.safetensors` file is an 8-byte little-endian header length, a JSON header with every tensor's dtype, shape
and byte range (`data_offsets`, counted from the end of the header), then the raw bytes. Because the engine knows
every shape before reading any weight, each shard's header is written first and the bytes are appended as blocks
stream past, one block in memory at a time. Reading goes the other way: the header alone says where each tensor's
bytes are, so a frozen chunk can read them straight from the file and a merge can plan before reading a tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "DTYPES",
    "DamagedSafetensors",
    "DTYPE_NAMES",
    "TensorRange",
    "TensorSpec",
    "UnsupportedDtype",
    "encode_header",
    "index_ranges",
    "plan_shards",
    "read_header",
    "safetensors_index",
    "shard_index",
    "shard_names",
    "write_safetensors_shards",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtype names read and written here, and their torch dtypes."""

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
"""The same table the other way: what a header says for a tensor of each torch dtype."""

TensorSpec = tuple[str, torch.Size, torch.dtype]
"""A tensor to write: name, shape, dtype."""


class UnsupportedDtype(ValueError):
    """A safetensors file stores a tensor in a dtype outside `DTYPES` (FP8, say). The attributes say which, so a
    caller can tell the user what to do instead."""

    def __init__(self, path: Path, name: str, dtype: str) -> None:
        super().__init__(f"{path}: tensor {name} has dtype {dtype}, which finetune cannot read")
        self.path, self.name, self.dtype = path, name, dtype


@dataclass(frozen=True)
class TensorRange:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


class DamagedSafetensors(ValueError):
    """A file that is not a whole safetensors file: its header is damaged, or it ends before its last tensor."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}; download or save the weights again")
        self.path = path


_MAX_HEADER = 100_000_000  # the largest header the safetensors library reads


def read_header(path: Path) -> dict[str, TensorRange]:
    """Every tensor of one `.safetensors` file, in header order, from its header alone (no tensor is read), having
    checked that the file is one: an 8-byte little-endian header length, a JSON object of {dtype, shape,
    data_offsets} entries, and as many bytes after it as the offsets reach. Checked here because a damaged file
    otherwise fails with a struct or JSON error that names neither the file nor the fix, or not until a read.

    Raises:
        DamagedSafetensors: a damaged header, or a file cut short.
        UnsupportedDtype: a tensor's dtype is not in `DTYPES`.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise DamagedSafetensors(path, f"is not a valid safetensors file (it is {size} bytes, shorter than the "
                                           "8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= min(size - 8, _MAX_HEADER):
            reason = "is 0, too short for any header" if length == 0 else \
                f"{length} does not fit the file's {size} bytes"
            raise DamagedSafetensors(path, f"is not a valid safetensors file (its header length {reason})")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedSafetensors(path, "is not a valid safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise DamagedSafetensors(path, "is not a valid safetensors file (its header is not a JSON object)")
    start, ranges, end = 8 + length, {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], torch.Size(entry["shape"]), entry["data_offsets"]
            if not 0 <= int(begin) <= int(stop):
                raise ValueError(begin, stop)
        except (KeyError, TypeError, ValueError):
            raise DamagedSafetensors(path, f"is not a valid safetensors file (its header entry for {name} is "
                                           "malformed)") from None
        if dtype not in DTYPES:
            raise UnsupportedDtype(path, name, dtype)
        ranges[name] = TensorRange(path, start + int(begin), int(stop) - int(begin), DTYPES[dtype], shape)
        end = max(end, int(stop))
    if start + end > size:
        raise DamagedSafetensors(path, f"is truncated: its header lists {end} bytes of tensors, but {size - start} "
                                       "follow it (a copy or download was cut short)")
    return ranges


def safetensors_index(directory: Path, prefix: str = "model") -> dict[str, Path]:
    """Tensor name -> file, from `model.safetensors.index.json` or the single `model.safetensors`.

    Raises:
        FileNotFoundError: `directory` holds neither; the message says how to save a model that does.
    """
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


def index_ranges(index: dict[str, Path]) -> dict[str, TensorRange]:
    """Every tensor of `index` (name -> file, as `safetensors_index` gives it), in the index's order, each file's
    header read once.

    Raises:
        UnsupportedDtype: a tensor's dtype is not in `DTYPES`.
    """
    headers = {path: read_header(path) for path in dict.fromkeys(index.values())}
    return {name: headers[path][name] for name, path in index.items()}


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, as transformers shards: a tensor starts a new shard when the current one would pass the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec[1].numel() * spec[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    """The file names transformers gives `count` shards: `model.safetensors`, or `model-00001-of-00002...`."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def shard_index(shards: list[list[TensorSpec]], names: list[str]) -> dict[str, object]:
    """The `model.safetensors.index.json` of several shards: total bytes and each tensor's file."""
    return {
        "metadata": {"total_size": sum(s.numel() * d.itemsize for shard in shards for _, s, d in shard)},
        "weight_map": {spec[0]: name for shard, name in zip(shards, names) for spec in shard},
    }


def encode_header(shard: list[TensorSpec]) -> bytes:
    """A shard's header as it starts the file: its 8-byte little-endian length, then the JSON (tensors in file
    order, byte ranges relative to the data section), padded with spaces so that the data starts 8-byte aligned,
    as the safetensors library pads it."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}  # as save_pretrained writes it
    offset = 0
    for name, shape, dtype in shard:
        end = offset + shape.numel() * dtype.itemsize
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors_shards(
    directory: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int,
    prefix: str = "model",
) -> list[Path]:
    """Write `tensors` (yielded in `specs` order) as safetensors shards plus an index when there are several.

    Files are named as transformers names them (`model.safetensors`, `model-00001-of-00002.safetensors`,
    `model.safetensors.index.json`), with `prefix` in place of "model". Returns the final paths written. The
    iterator may hold one block in memory; each tensor is written as soon as it is yielded. Files are written
    under temporary names and renamed at the end, so an interrupted export never leaves a directory that looks
    complete.

    Raises:
        RuntimeError: the stream yields a tensor out of `specs` order, or more tensors than `specs`.
    """
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards), prefix)
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    written = [_write_shard(directory, name, shard, stream) for shard, name in zip(shards, names)]
    if next(stream, None) is not None:  # also runs the stream's cleanup (releasing what it holds) now
        raise RuntimeError("export stream yielded more tensors than its specs")
    if len(shards) > 1:
        index = shard_index(shards, names)
        temporary = directory / f".{prefix}.safetensors.index.json.partial"
        temporary.write_text(json.dumps(index, indent=2))
        written.append((temporary, directory / f"{prefix}.safetensors.index.json"))
    for temporary, final in written:  # rename last: a crash before this point leaves only .partial files
        os.replace(temporary, final)
    return [final for _, final in written]


def _write_shard(
    directory: Path, name: str, shard: list[TensorSpec], stream: Iterator[tuple[str, torch.Tensor]]
) -> tuple[Path, Path]:
    """Write one shard under a temporary name, fsynced; returns (temporary, final) for the caller to rename."""
    temporary = directory / f".{name}.partial"
    with open(temporary, "wb") as file:
        file.write(encode_header(shard))
        for expected, shape, dtype in shard:
            got, tensor = next(stream)
            if got != expected or tensor.shape != shape or tensor.dtype != dtype:
                raise RuntimeError(f"export stream out of order: expected {expected}, got {got}")
            file.write(memoryview(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()))  # no copy
        file.flush()
        os.fsync(file.fileno())
    return temporary, directory / name
