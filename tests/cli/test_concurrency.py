"""One run per output directory, runs that share --nvme kept apart, and swap directories nobody else can plant
(cli/run_lock.py, offload/swap_area.py), through the installed script as users (and others on a shared disk)
would meet them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import FINETUNE, RUN_ARGS, Tiny, assert_same_run, run_finetune, summary

from finetune.cli.run_lock import swap_name

pytestmark = pytest.mark.integration


def _start(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([FINETUNE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"no {what} after 120 s"
        time.sleep(0.01)


def _holds_lock(output: Path, pid: int) -> Callable[[], bool]:
    lock = output / ".lock"
    return lambda: lock.exists() and lock.read_text().strip() == str(pid)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def _refused(result: subprocess.CompletedProcess, output: Path, pid: int) -> None:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: --output {output} is in use by pid {pid} (a finetune run that is still going); wait "
                      "for it to end, or choose another --output"], result.stderr


LONG = ["--steps", "100000"]  # the first run must outlive the second's start: it is killed at the end


def test_the_same_command_twice_is_refused(run_args, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = _start(env, [*run_args(output), *LONG])
    try:
        _wait_until(_holds_lock(output, first.pid), first, "lock")
        _refused(run_finetune(env, *run_args(output), *LONG), output, first.pid)
    finally:
        _stop(first)


def test_resume_beside_the_live_run_is_refused(run_args, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = _start(env, [*run_args(output), *LONG])
    try:
        _wait_until(lambda: (output / "checkpoints" / "manifest.json").exists(), first, "checkpoint")
        _refused(run_finetune(env, "run", "--resume", "--output", output), output, first.pid)
    finally:
        _stop(first)


def test_runs_sharing_nvme_stay_apart(tiny: Tiny, learnable: Path, reference_run, env, tmp_path: Path) -> None:
    swap = tmp_path / "shared-swap"
    outputs = [tmp_path / "a", tmp_path / "b"]
    runs = [_start(env, ["run", tiny.model, learnable, "--output", output, *RUN_ARGS, *tiny.budget_flags(swap)])
            for output in outputs]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    for output in outputs:
        assert_same_run(output, reference_run[0])  # as if each had the disk to itself
    # Nothing left. The run that made --nvme removes it too if it closes last, so it may be gone altogether.
    assert not swap.exists() or list(swap.iterdir()) == []


def test_planted_link_in_nvme_is_refused_and_its_target_untouched(run_args, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    swap = output.parent / f"{output.name}-swap"
    swap.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_bytes(b"someone's file")
    (swap / f"finetune-{swap_name(output)}").symlink_to(victim)  # where this run's swap files would go
    result = run_finetune(env, *run_args(output))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: --nvme {swap}: swap directory ") and \
        "is a symbolic link" in result.stderr and "choose another --nvme" in result.stderr, result.stderr
    assert os.listdir(victim) == ["data"] and (victim / "data").read_bytes() == b"someone's file"
    assert not output.exists()  # refused before its first write


def test_link_named_like_a_swap_file_is_avoided(run_args, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    swap = output.parent / f"{output.name}-swap"
    swap.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone's file")
    for name in ("model.layers.0.weights", "model.layers.0.master"):  # the names swap files had in the directory
        (swap / name).symlink_to(victim)
    result = run_finetune(env, *run_args(output), "--steps", "4", "--json")
    assert summary(result)["status"] == "completed"
    assert victim.read_bytes() == b"someone's file"
    assert sorted(os.listdir(swap)) == ["model.layers.0.master", "model.layers.0.weights"]
