"""The checkpoints of a run, and the manifest that says which of them are complete.

    OUTPUT/checkpoints/manifest.json      {"checkpoints": [{"name", "step", "files": {path: bytes},
                                                           "checksums": {path: xxh3}}, ...], "checksum": xxh3}
    OUTPUT/checkpoints/step-00000100/     engine.save_checkpoint + the tokenizer + run-config.yaml. With --nvme
                                          in swap: engine_state.pt (step, extra, each chunk's swap file version
                                          and checksum; checksums.json), the state itself in the swap files.
                                          Portable (--portable-checkpoints, a finished run's last, no --nvme):
                                          also the weights as a HF model (with --lora only the peft adapter) and
                                          the optimizer state.

The engine writes each checkpoint directory atomically. This layer adds the tokenizer and run config, fsyncs
them, and only then replaces the manifest (write, fsync, rename, fsync the directory). A checkpoint counts only
once the manifest lists it. A crash or a full disk at any moment therefore leaves the previous manifest and
every checkpoint it lists untouched.

Nothing damaged is resumed from. The manifest carries a checksum of its own content, the size of every file,
and a checksum of each file this layer adds and of the engine's checksums.json, which in turn covers the
engine's files (verified by `Engine.load_checkpoint`): so a flipped byte anywhere a resume reads is refused
with the file named and the previous checkpoint offered, before it is parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..offload import (
    CHECKSUMS_FILE,
    ChecksumMismatch,
    checksum_file,
    checksum_json,
    fsync_tree,
    verify_checksums,
    write_atomic,
)
from .errors import FinetuneError, disk_full

__all__ = ["Checkpoints", "Entry", "RUN_CONFIG", "crash_point"]

MANIFEST = "manifest.json"
RUN_CONFIG = "run-config.yaml"


@dataclass
class Entry:
    """One complete checkpoint."""

    name: str
    step: int
    files: dict[str, int] = field(default_factory=dict)
    """Size in bytes of every file in it, relative to its directory."""
    checksums: dict[str, str] = field(default_factory=dict)
    """XXH3 of the files outside the engine's own checksums.json, and of checksums.json itself."""
    swap: str | None = None
    """The swap directory whose files hold its state (a checkpoint in swap), or None (portable)."""


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
            manifest = json.loads(path.read_text())
            listed = manifest["checkpoints"]
            intact = manifest["checksum"] == checksum_json(listed)
            entries = [Entry(**item) for item in listed] if intact else []
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            raise FinetuneError(f"{path} is damaged (it does not match its own checksum); restore it from a backup, "
                                "or start a new --output")
        return entries

    def latest(self, name: str | None = None) -> Entry:
        """The newest complete checkpoint (or the one called `name`), after checking its files are whole and its
        own files' checksums (the engine checks the rest when it loads them).

        Raises:
            FinetuneError: no checkpoint (of that name), or a file missing, of the wrong size, or damaged.
        """
        entries = self.entries()
        if not entries and (self.root / MANIFEST).exists():
            raise FinetuneError(f"{self.root} keeps no checkpoint (--keep-checkpoints 0 drops them once the run's "
                                f"final model is written: {self.output / 'final'}); to train further, start a new "
                                "--output")
        if not entries:
            raise FinetuneError(
                f"--resume: no checkpoint in {self.root} ({MANIFEST} is missing); run without --resume to start"
            )
        chosen = [e for e in entries if e.name == name] if name is not None else entries[-1:]
        if not chosen:
            raise FinetuneError(f"--resume-from {name}: {self.root} has no such checkpoint; it holds "
                                f"{', '.join(e.name for e in entries)}")
        entry = chosen[0]
        problem = _damage(self.root / entry.name, entry)
        if problem is not None:
            raise FinetuneError(f"checkpoint {self.root / entry.name} is damaged: {problem}; {self.fallback(entry)}")
        return entry

    def fallback(self, damaged: Entry) -> str:
        """What to do about a damaged checkpoint: go back to the newest earlier one that verifies, if one is kept."""
        for entry in reversed([e for e in self.entries() if e.step < damaged.step]):
            directory = self.root / entry.name
            if _damage(directory, entry) is None and _engine_files_intact(directory):
                return (f"restore the file, or go back to the checkpoint before it, which is intact: finetune run "
                        f"--resume-from {entry.name} --output {self.output}")
        return "no earlier checkpoint that is intact is kept: restore the file from a backup, or start a new --output"

    def drop_after(self, engine: Any, kept: Entry) -> list[str]:
        """Forget every checkpoint newer than `kept` (a run going back to it: `--resume-from`), manifest first, so
        a kill midway leaves `kept` the latest; returns their names."""
        entries = self.entries()
        newer = [e for e in entries if e.step > kept.step]
        if newer:
            self._publish([e for e in entries if e.step <= kept.step])
            for entry in newer:
                engine.drop_checkpoint(self.root / entry.name)
        return [e.name for e in newer]

    def clear(self, engine: Any) -> None:
        """Drop every checkpoint, manifest first (`--keep-checkpoints 0`, once OUTPUT/final/ holds the model); the
        manifest stays, listing none, so the directory still reads as a run."""
        entries = self.entries()
        self._publish([])
        for entry in entries:
            engine.drop_checkpoint(self.root / entry.name)

    def path(self, entry: Entry) -> Path:
        return self.root / entry.name

    def save(self, engine: Any, step: int, *, extra: dict[str, Any], tokenizer: Any, run_config: str,
             keep: int, portable: bool = False, final: bool = False, best: int | None = None) -> Entry:
        """Write checkpoint `step`, publish it in the manifest, then drop all but the newest `keep` (0 keeps the
        newest, so that a crash can resume, until `clear`) and the checkpoint of step `best` (--keep-best).

        The engine keeps it in swap unless `portable` or `final`. `final` (a finished run's last: what is exported)
        is portable, and the checkpoints in swap are dropped after it: they exist to resume a run that has not
        finished, and a finished run leaves nothing in the swap directory. (The best is saved portable.)

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
        portable = portable or final or engine.swap_directory is None
        try:
            if not portable:
                engine.flush()
                crash_point("flushed", step)
            engine.save_checkpoint(target, extra=extra, portable=portable)
            tokenizer.save_pretrained(target)
            (target / RUN_CONFIG).write_text(run_config)
            fsync_tree(target)
        except BaseException as error:
            engine.drop_checkpoint(target)  # not in the manifest yet, so nothing refers to it
            if disk_full(error):
                previous = f"{self.root / entries[-1].name} is intact" if entries else "there is no earlier one"
                raise FinetuneError(
                    f"no space left to save checkpoint step {step} under {self.root} ({error.strerror}); the previous "
                    f"checkpoint {previous}; free space, then run: finetune run --resume --output {self.output}"
                ) from None
            raise
        files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
        entry = Entry(name, step, files, _checksums_of_added(target, files),
                      None if portable else str(engine.swap_directory))
        crash_point("written", step)
        entries.append(entry)
        newest = entries[-max(keep, 1):]
        kept = [e for e in entries if (e in newest or e.step == best) and (not final or e.swap is None)]
        self._publish(kept)
        crash_point("published", step)
        for dropped in [e for e in entries if e not in kept]:
            engine.drop_checkpoint(self.root / dropped.name)
            crash_point("reclaiming", step)
        return entry

    def _publish(self, entries: list[Entry]) -> None:
        """Replace the manifest with one listing `entries`, atomically and durably."""
        listed = [asdict(e) for e in entries]
        write_atomic(self.root / MANIFEST, json.dumps({"checkpoints": listed, "checksum": checksum_json(listed)},
                                                      indent=1))


def crash_point(name: str, step: int) -> None:
    """Fault injection for the kill tests (tests/cli/test_kill_resume.py, benchmarks/kill_resume.py): with
    $FINETUNE_CRASH_AT set to `name:step` the process kills itself here, as a power cut would, at the moments a
    random kill rarely hits (between the flush of a checkpoint in swap and its commit, between a checkpoint's last
    file and its manifest entry, between the manifest and the removal of the checkpoints it dropped, in the middle
    of that removal)."""
    if os.environ.get("FINETUNE_CRASH_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _engine_files_intact(directory: Path) -> bool:
    try:
        verify_checksums(directory)
    except ChecksumMismatch:
        return False
    return True


def _checksums_of_added(directory: Path, files: dict[str, int]) -> dict[str, str]:
    """Checksums of what the engine's checksums.json does not cover: the tokenizer, the run config, and it."""
    covered = set(json.loads((directory / CHECKSUMS_FILE).read_text())["files"])
    return {name: checksum_file(directory / name) for name in files if name not in covered}


def _damage(directory: Path, entry: Entry) -> str | None:
    """What is wrong with checkpoint `directory` against its manifest entry (sizes, then checksums), or None."""
    for name, size in entry.files.items():
        path = directory / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            return f"{name} is {'missing' if actual is None else f'{actual} bytes'}, the manifest says {size} bytes"
    if CHECKSUMS_FILE not in entry.checksums:
        return f"its manifest entry has no checksum of {CHECKSUMS_FILE} (written by an older finetune?)"
    for name, expected in entry.checksums.items():
        if checksum_file(directory / name) != expected:
            return f"{name} does not match the checksum saved with it (its bytes changed on the disk)"
    return None
