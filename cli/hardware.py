"""Disk speed as the engine sees it, for `finetune info --bandwidth`.

The test goes through the engine's own NVMe backend (O_DIRECT where the filesystem allows it), so the number
is what swapping will get, not what the page cache makes a disk look like.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..offload import ThreadPoolBackend, aligned_empty
from .errors import FinetuneError

__all__ = ["disk_bandwidth"]


def disk_bandwidth(directory: Path, nbytes: int) -> tuple[float, float]:
    """(write, read) bytes per second of one `nbytes` file in a temporary directory under `directory`.

    Raises:
        FinetuneError: the directory cannot be written.
    """
    buffer = aligned_empty(nbytes)
    buffer.random_(0, 256)  # incompressible, so a compressing filesystem cannot flatter the result
    probe = directory / ".finetune-bandwidth"
    try:
        with ThreadPoolBackend(probe) as backend:
            file = backend.open("probe", nbytes)
            started = time.perf_counter()
            file.write_from(buffer).result()
            file.sync()  # count the bytes reaching the disk, not the queue
            write = nbytes / (time.perf_counter() - started)
            started = time.perf_counter()
            file.read_into(buffer).result()
            read = nbytes / (time.perf_counter() - started)
    except OSError as error:
        raise FinetuneError(
            f"cannot measure the disk at {directory} ({error.strerror}); pass a writable --path"
        ) from None
    return write, read
