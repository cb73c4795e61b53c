"""One run per output directory, and the swap directory that belongs to it.

Two `finetune run` on one `--output` would interleave their metrics and checkpoints, and a `--resume` beside a
live run would load a checkpoint the other is still writing. So `train` holds an advisory lock on `--output`
(offload/locks.py: the kernel drops it when the holder dies, kill -9 included) from before its first write to
its end, and a second process is refused with the holder's pid. The checks `prepare` made without the lock (is
there a run here? which checkpoint is the latest?) are made again under it, since another process may have
changed the directory in between.

The run's swap files live in `--nvme`/finetune-<name>, the name derived from the output directory's real path:
runs with different outputs never share a file, and the next process of the same run finds (and frees) what a
killed one left there (offload/swap_area.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..offload import DirectoryLock, LockHeld
from .checkpoints import Checkpoints, Entry
from .errors import FinetuneError, disk_full

__all__ = ["hold_output", "output_full", "refuse_if_running", "swap_name"]


def swap_name(output: Path) -> str:
    """The name of the run's directory inside `--nvme`: the same for every process of one output directory."""
    return "run-" + hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:16]


@contextmanager
def hold_output(output: Path, resume_from: Entry | None, latest_seen: str | None) -> Iterator[None]:
    """Lock `output` (making it if new) for the body; `resume_from` is the checkpoint `prepare` chose, and
    `latest_seen` the newest it saw listed (None: none).

    A directory this made that holds nothing but the lock when the body ends (the run failed before its first
    write) is removed again, so a failed start leaves nothing behind.

    Raises:
        FinetuneError: another live process holds `output`, or the directory changed since `prepare` looked.
    """
    created = not output.exists()
    lock = DirectoryLock(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as error:
        if not disk_full(error):
            raise
        raise output_full(output, error) from None
    except LockHeld as held:
        raise _in_use(output, held.holder) from None
    try:
        _check_unchanged(output, resume_from, latest_seen)
        yield
    finally:
        alone = created and os.listdir(output) == [lock.path.name]
        lock.release(remove=alone)
        if alone:
            output.rmdir()


def refuse_if_running(output: Path) -> None:
    """Before reading a run's files without the lock (`prepare`, the config of `--resume`): refuse at once when a
    live process holds `output`, rather than with what its half-written state looks like. Writes nothing.

    Raises:
        FinetuneError: a live process holds the lock; the message names its pid.
    """
    holder = DirectoryLock(output).holder()
    if holder is not None:
        raise _in_use(output, holder if holder > 0 else None)


def _in_use(output: Path, holder: int | None) -> FinetuneError:
    who = f"pid {holder}" if holder is not None else "another process"
    return FinetuneError(f"--output {output} is in use by {who} (a finetune run that is still going); wait for it to "
                         "end, or choose another --output")


def output_full(output: Path, error: OSError) -> FinetuneError:
    """The error for a full disk under `--output` before the run has anything to lose."""
    return FinetuneError(f"no space left on --output {output} ({error.strerror}); free space there, or choose "
                         "another --output")


def _check_unchanged(output: Path, resume_from: Entry | None, latest_seen: str | None) -> None:
    """What `prepare` found before the lock, still true under it."""
    entries = Checkpoints(output).entries()
    latest = entries[-1].name if entries else None
    if resume_from is None and latest is not None:
        raise FinetuneError(f"--output {output} already holds a run; pass --resume to continue it, or choose a new "
                            "--output")
    if resume_from is not None and (latest != latest_seen or resume_from not in entries):
        raise FinetuneError(f"--output {output} changed while this run started (its latest checkpoint is now "
                            f"{latest}); run the same command again")
