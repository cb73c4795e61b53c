"""Checkpoint directories that are complete or absent, never half written.

A checkpoint is an ordinary Hugging Face model directory (config + safetensors shards of the fp32 master
weights, so `from_pretrained` and `finetune export` read it as a model), plus the optimizer's state chunks in
`optimizer*.safetensors` and the engine's small state in `engine_state.pt`. A peft model whose base is read
from its own files checkpoints only its adapter (a peft adapter directory) in place of the model. It is written under a temporary
name next to its final place, every file and the directory are fsynced, and only then is it renamed: a crash
or a full disk at any point leaves the previous checkpoints as they were and at most a `.partial` directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ENGINE_STATE_FILE", "OPTIMIZER_PREFIX", "atomic_directory", "fsync_tree"]

ENGINE_STATE_FILE = "engine_state.pt"
# The files of a peft adapter directory (PeftModel.save_pretrained): its LoraConfig and its weights.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_PREFIX = "optimizer"
FORMAT_VERSION = 1


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then each directory, so a rename after this publishes only bytes
    that are on the disk."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(root))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes `final` in one rename, on error it is removed.

    Raises:
        FileExistsError: `final` exists already (a checkpoint is never overwritten in place).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists already; choose a new checkpoint directory or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a crash: never complete, safe to drop
    temporary.mkdir()
    try:
        yield temporary
        fsync_tree(temporary)
        os.rename(temporary, final)
        _fsync_directory(final.parent)  # the rename itself is durable only once the parent is synced
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
