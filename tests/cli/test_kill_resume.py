"""kill -9 at any moment of a run that checkpoints often, then resume: the finished run equals the one never
stopped, bit for bit (final weights, optimizer state, every logged loss), and nothing of the killed process is
left in --nvme.

The moments, in one run killed again and again: the four a random kill rarely hits, through the crash points
of cli/checkpoints.py (between the flush of a checkpoint in swap and the commit of its versions; between a
checkpoint's last file and its manifest entry; between the manifest and the removal of the checkpoint it dropped,
whose swap versions go with it; during that removal), and `$FINETUNE_KILL_MOMENTS` random ones (default 2,
so CI covers 6 in all; `FINETUNE_KILL_MOMENTS=20 pytest tests/cli/test_kill_resume.py` is the 20-moment
measurement of issue 16; `$FINETUNE_KILL_SEED` replays one). A random moment is a random step of the 24 (after
the last checkpoint) plus a random delay of up to 60 ms after its record appears: inside steps, evals,
checkpoint writes and manifest commits alike.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import FINETUNE, assert_same_run, run_finetune, summary

pytestmark = pytest.mark.integration

RANDOM_MOMENTS = int(os.environ.get("FINETUNE_KILL_MOMENTS", "2"))
SEED = int(os.environ.get("FINETUNE_KILL_SEED", str(random.SystemRandom().randrange(2**31))))
# "flushed" comes first: it is never hit at step 24, where a finished run's last checkpoint is portable.
CRASH_POINTS = [("flushed", 8), ("written", 12), ("published", 16), ("reclaiming", 20)]
CHECKPOINT_EVERY = 4  # RUN_ARGS: a checkpoint every 4 steps, 3 kept
STEPS = 24


def _moments() -> list[tuple[str, int, float]]:
    """(crash point or "random", step, delay after the step's record), in the order of the run."""
    chooser = random.Random(SEED)
    randoms = [("random", chooser.randrange(1, STEPS), chooser.uniform(0, 0.06)) for _ in range(RANDOM_MOMENTS)]
    return sorted([(name, step, 0.0) for name, step in CRASH_POINTS] + randoms, key=lambda moment: moment[1])


def _kill_after(env: dict[str, str], args: list[str], output: Path, step: int, delay: float) -> int:
    """Run `finetune ARGS` and SIGKILL it `delay` s after metrics.jsonl shows `step` (a step this process runs:
    a resumed run first drops the records after its checkpoint); returns its exit code (0: it finished first)."""
    process = subprocess.Popen([FINETUNE, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and any(f'"step": {step},' in line and '"loss"' in line
                                    for line in metrics.read_text().splitlines()):
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.communicate(timeout=120)
    return process.returncode


def _crash_step(step: int, saved: int) -> int:
    """Where a crash point is hit: at its own step's checkpoint, or, when random kills that came late carried the
    run past that, at the next checkpoint after the one saved."""
    return max(step, (saved // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY)


def _saved_step(output: Path) -> int:
    manifest = output / "checkpoints" / "manifest.json"
    return json.loads(manifest.read_text())["checkpoints"][-1]["step"] if manifest.exists() else 0


def test_killed_again_and_again_resumes_bit_identical(run_args, reference_run, env, tmp_path: Path) -> None:
    """One run, killed at every moment in turn, each time resumed (or, before its first checkpoint, started
    again), then run to the end."""
    output = tmp_path / "run"
    swap = output.parent / f"{output.name}-swap"  # run_args's --nvme
    killed = []
    for kind, step, delay in _moments():
        saved = _saved_step(output)
        args = ["run", "--resume", "--output", str(output)] if saved else run_args(output)
        if kind != "random":
            code = run_finetune({**env, "FINETUNE_CRASH_AT": f"{kind}:{_crash_step(step, saved)}"}, *args).returncode
        else:
            code = _kill_after(env, args, output, max(step, saved + 1), delay)
        assert code in (-signal.SIGKILL, 0), f"seed {SEED}, {kind} at step {step}: exit {code}"
        killed.append((kind, step, saved, code))
    assert [code for kind, *_, code in killed if kind != "random"] == [-signal.SIGKILL] * len(CRASH_POINTS), killed
    result = summary(run_finetune(env, "run", "--resume", "--output", output, "--json"))
    assert result["status"] == "completed" and result["step"] == STEPS, f"seed {SEED}: {killed}"
    assert_same_run(output, reference_run[0])
    assert list(swap.iterdir()) == [], f"seed {SEED}: left in --nvme"
    print(f"seed {SEED}: (moment, step, checkpoint step before, exit code) {killed}")  # shown with pytest -s
