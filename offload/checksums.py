"""Checksums of what a resume reads, so that a damaged byte is refused with the file named instead of trained on.

A flipped byte in a weight or an RNG state loads without a word and makes the resumed run differ from the one
that was saved; a flipped byte in a header or a pickle gives a traceback that names neither the file nor the
fix. So every file of a checkpoint is hashed when it is written, the hashes go into `checksums.json` beside them
(itself checked by a hash of its own content), and a load verifies every file before it parses any.

The hash is xxHash's XXH3 (64 bits, via the `xxhash` package, which `datasets` already depends on): about
11 GB/s on one core of the CI VM, faster than any disk here, and made for finding damage, not attacks (a
checkpoint's directory is the user's own).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    import torch

__all__ = ["CHECKSUMS_FILE", "ChecksumMismatch", "checksum_file", "checksum_json", "checksum_tensor",
           "verify_checksums", "write_checksums"]

CHECKSUMS_FILE = "checksums.json"
_READ_BYTES = 8 << 20


class ChecksumMismatch(ValueError):
    """A file is not what was written: its bytes, or the record of them, changed."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path} {problem}")


def checksum_json(value: object) -> str:
    """The checksum of a JSON value's canonical form (sorted keys, no spaces): the same however it is laid out."""
    return xxhash.xxh3_64_hexdigest(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def checksum_tensor(t: torch.Tensor) -> str:
    """The checksum of a contiguous tensor's bytes (one in device memory is copied to the host first)."""
    import torch  # here, not at the top: the checks of checkpoint files (the CLI's manifest) need no torch

    if t.device.type != "cpu":
        t = t.cpu()
    return xxhash.xxh3_64_hexdigest(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def checksum_file(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as file:
        while block := file.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path, names: Iterable[str]) -> None:
    """Hash the files `names` (relative to `directory`) into its checksums.json."""
    files = {name: checksum_file(directory / name) for name in sorted(names)}
    record = {"files": files, "checksum": checksum_json(files)}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(record, indent=1))


def verify_checksums(directory: Path) -> list[str]:
    """Check every file checksums.json lists; returns their names.

    Raises:
        ChecksumMismatch: checksums.json is missing or damaged, or a file is missing or does not match.
    """
    record_path = directory / CHECKSUMS_FILE
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
        intact = isinstance(files, dict) and record["checksum"] == checksum_json(files)
    except FileNotFoundError:
        raise ChecksumMismatch(record_path, "is missing, so nothing in the checkpoint can be verified") from None
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise ChecksumMismatch(record_path, "is damaged (it does not match its own checksum)")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ChecksumMismatch(path, "is missing")
        if checksum_file(path) != expected:
            raise ChecksumMismatch(path, "does not match the checksum saved with it: its bytes changed on the disk")
    return list(files)
