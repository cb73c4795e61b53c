"""Helpers of the CLI tests: the installed `finetune` script as a subprocess, stopping it mid-run, learnable
data, and the tiny model's description. Fixtures built from them are in conftest.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FINETUNE = str(Path(sys.executable).with_name("finetune"))
WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


def example_module() -> object:
    """examples/finetune_stdlib.py, whose tokenizer and model builders the tests share (keeping it working)."""
    spec = importlib.util.spec_from_file_location("finetune_stdlib", REPO / "examples" / "finetune_stdlib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counting(start: int, length: int) -> str:
    """Number words counting up from `start`, wrapping: a sequence a 2-layer model learns in a few dozen steps."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))


@dataclass
class Tiny:
    """A tiny model directory (with tokenizer) and the engine's minimum budget for it."""

    model: Path
    device_bytes: int
    host_bytes: int

    def budget_flags(self, swap: Path) -> list[str]:
        """The smallest budget the engine accepts, so the state really streams through `swap`."""
        return ["--device-memory", str(self.device_bytes), "--host-memory", str(self.host_bytes), "--nvme", str(swap)]


def run_finetune(env: dict[str, str], *args: str | Path, timeout: float = 180,
                 **options: object) -> subprocess.CompletedProcess:
    """`finetune ARGS` as a subprocess; returns its exit code, stdout and stderr."""
    return subprocess.run([FINETUNE, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          **options)


def run_in_process(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    """`finetune ARGS` run by the console script's own function in this process, without the seconds a new
    interpreter spends importing torch: for inputs refused before training. Of `env` only what the CLI reads at
    call time applies (its cache directory, the terminal width); the hub's settings are read when it is imported,
    so a check that needs the hub offline runs as a subprocess (`run_finetune`)."""
    from finetune.cli.main import run_script

    stdout, stderr = io.StringIO(), io.StringIO()
    saved = {name: os.environ.get(name) for name in _CALL_TIME_ENV}
    os.environ.update({name: env[name] for name in _CALL_TIME_ENV if name in env})
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run_script([str(arg) for arg in args])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(["finetune", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())


_CALL_TIME_ENV = ("FINETUNE_CACHE_DIR", "COLUMNS")


def summary(result: subprocess.CompletedProcess) -> dict:
    """The JSON summary `--json` prints as the last line of stdout."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def interrupt_at(env: dict[str, str], args: list[str], output: Path, step: int, sig: signal.Signals,
                 **options: object) -> subprocess.CompletedProcess:
    """Start `finetune ARGS`, send `sig` once metrics.jsonl shows `step`, and wait for the process to end."""
    process = subprocess.Popen([FINETUNE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **options)
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            process.send_signal(sig)
            break
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same final weights and optimizer state (<= 1e-6) and the same logged losses as the reference run."""
    final = "checkpoints/step-00000024"
    for file in ("model.safetensors", "optimizer.safetensors"):
        mine, theirs = load_file(resumed / final / file), load_file(reference / final / file)
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=0, msg=f"{file}: {name}")
    records = [(resumed / "metrics.jsonl").read_text(), (reference / "metrics.jsonl").read_text()]
    mine, theirs = ([(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, text.splitlines())]
                    for text in records)
    assert [step for step, *_ in mine] == [step for step, *_ in theirs]
    for (step, loss, eval_loss), (_, loss_ref, eval_ref) in zip(mine, theirs):
        assert (loss is None) == (loss_ref is None) and (eval_loss is None) == (eval_ref is None), step
        torch.testing.assert_close(torch.tensor([loss or 0.0, eval_loss or 0.0]),
                                   torch.tensor([loss_ref or 0.0, eval_ref or 0.0]), atol=1e-6, rtol=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


RUN_ARGS = ["--steps", "24", "--batch-size", "4", "--seq-len", "24", "--lr", "1e-2", "--warmup-steps", "3",
            "--val-fraction", "0.1", "--eval-every", "8", "--checkpoint-every", "4", "--keep-checkpoints", "3"]
"""The run the resume tests stop and continue: long enough to stop mid-way, short enough for CI."""
