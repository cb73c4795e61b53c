"""Write a Hugging Face model directory (config + safetensors shards) without holding the model in memory.

The safetensors format is an 8-byte header length, a JSON header with every tensor's dtype, shape and byte
range, then the raw bytes. Because the engine knows every shape before reading any weight, each shard's
header is written first and the bytes are appended as blocks stream past, one block in memory at a time.
Files are written under temporary names and renamed at the end, so an interrupted export never leaves a
directory that looks complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

__all__ = ["SAFETENSORS_DTYPES", "write_safetensors_shards"]

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _shard_specs(
    specs: list[tuple[str, torch.Size, torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, torch.Size, torch.dtype]]]:
    shards: list[list[tuple[str, torch.Size, torch.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec[1].numel() * spec[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _header(shard: list[tuple[str, torch.Size, torch.dtype]]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard:
        end = offset + shape.numel() * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data section starts 8-byte aligned


def write_safetensors_shards(
    directory: Path,
    specs: list[tuple[str, torch.Size, torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int,
    prefix: str = "model",
) -> list[Path]:
    """Write `tensors` (yielded in `specs` order) as safetensors shards plus an index when there are several.

    Files are named as transformers names them (`model.safetensors`, `model-00001-of-00002.safetensors`,
    `model.safetensors.index.json`), with `prefix` in place of "model". Returns the final paths written. The
    iterator may hold one block in memory; each tensor is written as soon as it is yielded.
    """
    shards = _shard_specs(specs, max_shard_bytes)
    names = (
        [f"{prefix}.safetensors"]
        if len(shards) == 1
        else [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    written: list[tuple[Path, Path]] = []
    for shard, name in zip(shards, names):
        final = directory / name
        temporary = directory / f".{name}.partial"
        with open(temporary, "wb") as file:
            header = _header(shard)
            file.write(struct.pack("<Q", len(header)))
            file.write(header)
            for expected, shape, dtype in shard:
                got, tensor = next(stream)
                if got != expected or tensor.shape != shape or tensor.dtype != dtype:
                    raise RuntimeError(f"export stream out of order: expected {expected}, got {got}")
                file.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
            file.flush()
            os.fsync(file.fileno())
        written.append((temporary, final))
    if next(stream, None) is not None:  # also runs the stream's cleanup (releasing what it holds) now
        raise RuntimeError("export stream yielded more tensors than its specs")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.numel() * d.itemsize for _, s, d in specs)},
            "weight_map": {spec[0]: name for shard, name in zip(shards, names) for spec in shard},
        }
        temporary = directory / f".{prefix}.safetensors.index.json.partial"
        temporary.write_text(json.dumps(index, indent=2))
        written.append((temporary, directory / f"{prefix}.safetensors.index.json"))
    for temporary, final in written:  # rename last: a crash before this point leaves only .partial files
        os.replace(temporary, final)
    return [final for _, final in written]
