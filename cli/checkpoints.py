"""The checkpoints of a run, and the manifest that says which of them are complete.

    OUTPUT/checkpoints/manifest.json      {"checkpoints": [{"name", "step", "files": {path: bytes}}, ...]}
    OUTPUT/checkpoints/step-00000100/     engine.save_checkpoint (weights as a HF model, or with --lora only
                                          the peft adapter; optimizer state, step, extra) + the tokenizer +
                                          run-config.yaml

The engine writes each checkpoint directory atomically. This layer adds the tokenizer and run config, fsyncs
them, and only then replaces the manifest (write, fsync, rename, fsync the directory). A checkpoint counts only
once the manifest lists it. A crash or a full disk at any moment therefore leaves the previous manifest and
every checkpoint it lists untouched. The manifest records each file's size, so a damaged checkpoint is refused
at resume instead of half-loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..offload import fsync_tree, write_atomic
from .errors import FinetuneError, disk_full

__all__ = ["Checkpoints", "Entry", "RUN_CONFIG"]

MANIFEST = "manifest.json"
RUN_CONFIG = "run-config.yaml"


@dataclass
class Entry:
    """One complete checkpoint."""

    name: str
    step: int
    files: dict[str, int] = field(default_factory=dict)
    """Size in bytes of every file in it, relative to its directory."""


class Checkpoints:
    """The checkpoints under `output`/checkpoints, newest last."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.root = output / "checkpoints"

    def entries(self) -> list[Entry]:
        """Complete checkpoints, oldest first (empty before the first one)."""
        path = self.root / MANIFEST
        if not path.exists():
            return []
        try:
            return [Entry(**item) for item in json.loads(path.read_text())["checkpoints"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FinetuneError(f"cannot read {path} ({error}); restore it or start a new --output") from None

    def latest(self) -> Entry:
        """The newest complete checkpoint, after checking its files are whole.

        Raises:
            FinetuneError: no checkpoint, or a file missing or of the wrong size.
        """
        entries = self.entries()
        if not entries:
            raise FinetuneError(
                f"--resume: no checkpoint in {self.root} ({MANIFEST} is missing); run without --resume to start"
            )
        entry = entries[-1]
        for name, size in entry.files.items():
            path = self.root / entry.name / name
            actual = path.stat().st_size if path.exists() else None
            if actual != size:
                raise FinetuneError(
                    f"checkpoint {self.root / entry.name} is damaged: {name} is "
                    f"{'missing' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes; restore it"
                )
        return entry

    def path(self, entry: Entry) -> Path:
        return self.root / entry.name

    def save(self, engine: Any, step: int, *, extra: dict[str, Any], tokenizer: Any, run_config: str,
             keep: int) -> Entry:
        """Write checkpoint `step`, publish it in the manifest, then drop all but the newest `keep`.

        Raises:
            FinetuneError: the disk is full; the previous checkpoints are intact and the message says so.
        """
        entries = self.entries()
        name = f"step-{step:08d}"
        target = self.root / name
        saved = [e for e in entries if e.name == name]
        if saved:
            return saved[0]
        if target.exists():
            shutil.rmtree(target)  # written by a run killed before its manifest update: never complete
        try:
            engine.save_checkpoint(target, extra=extra)
            tokenizer.save_pretrained(target)
            (target / RUN_CONFIG).write_text(run_config)
            fsync_tree(target)
        except BaseException as error:
            shutil.rmtree(target, ignore_errors=True)  # not in the manifest yet, so nothing refers to it
            if disk_full(error):
                previous = f"{self.root / entries[-1].name} is intact" if entries else "there is no earlier one"
                raise FinetuneError(
                    f"no space left to save checkpoint step {step} under {self.root} ({error.strerror}); the previous "
                    f"checkpoint {previous}; free space, then run: finetune run --resume --output {self.output}"
                ) from None
            raise
        files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
        entry = Entry(name, step, files)
        entries.append(entry)
        write_atomic(self.root / MANIFEST, json.dumps({"checkpoints": [asdict(e) for e in entries[-keep:]]}, indent=1))
        for dropped in entries[:-keep]:
            shutil.rmtree(self.root / dropped.name, ignore_errors=True)
        return entry
