"""Runs that grow: `--resume --steps N` extends a finished or interrupted run; `--keep-best`,
`--early-stop-patience`, and `--keep-checkpoints 0`.

Reference for an extension: cli/schedule.py's rule. A run of 4 steps extended to 6 must equal, bit for bit
(torch.equal on OUTPUT/final/'s weights, == on every logged loss and rate), a new 6-step run with
`--decay-steps 4` (constant schedule: any new 6-step run). Reference for --early-stop-patience and --keep-best:
the rule applied to the run's own logged eval losses; for their resume, the same run never stopped.

The runs are in process (typer's CliRunner: no imports per run), on the tiny model with its state streamed
through --nvme; only the run killed at a crash point is a subprocess. Each is trained once, when a test first
needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import Tiny, run_finetune
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import train as cli_train
from finetune.cli.config import ConfigError, RunConfig
from finetune.cli.errors import FinetuneError
from finetune.cli.main import app
from finetune.cli.schedule import LearningRate, Schedule

pytestmark = pytest.mark.integration

runner = CliRunner()

STEPS = ["--batch-size", "4", "--seq-len", "24", "--lr", "1e-2", "--warmup-steps", "1", "--min-lr", "1e-3",
         "--val-fraction", "0.1", "--eval-every", "2", "--checkpoint-every", "2"]
"""The runs that grow: 4 steps, then 6; evals at every even step, so a 6-step run evaluates where they do."""

EARLY = ["--batch-size", "4", "--seq-len", "24", "--lr", "1e-1", "--schedule", "constant", "--val-fraction", "0.1",
         "--eval-every", "1", "--checkpoint-every", "100", "--keep-checkpoints", "1", "--keep-best",
         "--early-stop-patience", "2"]
"""A run whose eval loss soon stops improving (a rate this high makes the tiny model's eval loss jump about)."""


def _invoke(env: dict[str, str], *args: str | Path) -> tuple[dict, str]:
    """`finetune ARGS --json` in process; returns the summary and stderr."""
    result = runner.invoke(app, [*map(str, args), "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _records(output: Path) -> list[tuple]:
    """(step, train loss, rate, eval loss) of every record of metrics.jsonl."""
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss"))
            for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _equal(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    return mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)


def _kept(output: Path) -> list[str]:
    return [e["name"] for e in json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"]]


class Runs:
    """This module's runs, each trained once, on first use."""

    def __init__(self, root: Path, tiny: Tiny, data: Path, env: dict[str, str]) -> None:
        self.root, self.tiny, self.data, self.env = root, tiny, data, env
        self.done: dict[str, tuple[Path, dict, str]] = {}

    def new(self, name: str, *options: str) -> list[str]:
        """`run` arguments of a new run in ROOT/name, with its own --nvme."""
        return ["run", self.tiny.model, self.data, "--output", self.root / name, *options,
                *self.tiny.budget_flags(self.root / f"{name}-swap")]

    def trained(self, name: str, *options: str, then: tuple[str, ...] = ()) -> tuple[Path, dict, str]:
        """ROOT/name: a new run with `options`, then, with `then`, resumed with those options; its output and its
        last process's summary and stderr."""
        if name not in self.done:
            result = _invoke(self.env, *self.new(name, *options))
            if then:
                result = _invoke(self.env, "run", "--resume", "--output", self.root / name, *then)
            self.done[name] = (self.root / name, *result)
        return self.done[name]


def _longer(runs: Runs, schedule: Schedule) -> Path:
    """A new 6-step run under the rule: --decay-steps 4 (a constant schedule has no horizon)."""
    horizon = [] if schedule is Schedule.CONSTANT else ["--decay-steps", "4"]
    return runs.trained(f"longer-{schedule.value}", *STEPS, "--schedule", schedule.value, "--steps", "6",
                        *horizon)[0]


def _extended(runs: Runs, schedule: Schedule) -> tuple[Path, dict, str]:
    """A 4-step run, finished, then extended to 6 steps."""
    return runs.trained(f"extended-{schedule.value}", *STEPS, "--schedule", schedule.value, "--steps", "4",
                        then=("--steps", "6"))


@pytest.fixture(scope="module")
def runs(tiny: Tiny, learnable: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("extend"), tiny, learnable, env)


@pytest.mark.parametrize("schedule", list(Schedule), ids=[s.value for s in Schedule])
def test_extending_a_finished_run_equals_a_longer_run(runs: Runs, schedule: Schedule) -> None:
    output, summary, stderr = _extended(runs, schedule)
    longer = _longer(runs, schedule)
    assert (summary["status"], summary["step"], summary["final"]) == ("completed", 6, str(output / "final"))
    assert _records(output) == _records(longer)  # every loss, rate and eval loss, ==
    assert _equal(_weights(output / "final"), _weights(longer / "final"))  # final/ rewritten for the new end
    rates = {step: lr for step, loss, lr, _ in _records(output) if loss is not None}
    past = "steps 5-6 are past the decay horizon (--decay-steps 4): the new steps run at --min-lr 0.001; pass " \
           "--decay-steps 6 to stretch the decay"
    if schedule is Schedule.CONSTANT:
        assert rates[5] == rates[6] == 1e-2 and "decay horizon" not in stderr
    else:
        assert rates[4] == rates[5] == rates[6] == 1e-3 and past in " ".join(stderr.split())


def test_extending_an_interrupted_run_keeping_no_checkpoint(runs: Runs, env: dict[str, str]) -> None:
    """Killed after its step-2 checkpoint (--keep-checkpoints 0 still keeps the newest while running), resumed
    with --steps 6: the 6-step run under the rule, and only OUTPUT/final/ is left."""
    args = runs.new("interrupted", *STEPS, "--schedule", "linear", "--steps", "4", "--keep-checkpoints", "0")
    output = runs.root / "interrupted"
    killed = run_finetune({**env, "FINETUNE_CRASH_AT": "published:2"}, *args)
    assert killed.returncode < 0 and _kept(output) == ["step-00000002"], killed.stderr
    summary, _ = _invoke(env, "run", "--resume", "--output", output, "--steps", "6")
    longer = _longer(runs, Schedule.LINEAR)
    assert summary["status"] == "completed" and summary["checkpoint"] is None and "export" not in summary
    assert _records(output) == _records(longer)
    assert _equal(_weights(output / "final"), _weights(longer / "final"))
    assert _kept(output) == [] and sorted(p.name for p in (output / "checkpoints").iterdir()) == ["manifest.json"]
    assert list((runs.root / "interrupted-swap").iterdir()) == []
    with pytest.raises(FinetuneError, match="keeps no checkpoint .*start a new --output"):
        cli_train.configure({"output": str(output), "steps": 8}, resume=True)
    again = runner.invoke(app, [*map(str, args)], env=env)  # a new run would overwrite final/
    assert again.exit_code == 1 and "already holds a run" in again.stderr, again.output


def test_fewer_steps_than_taken_are_refused(runs: Runs, env: dict[str, str]) -> None:
    output, _, _ = _extended(runs, Schedule.LINEAR)
    result = runner.invoke(app, ["run", "--resume", "--output", str(output), "--steps", "5"], env=env)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --steps 5 is fewer than the 6 steps the run has taken (checkpoint step-00000006); a run can be "
        "extended, not cut back: pass --steps 6 or more")


def test_decay_steps_changed_on_resume_says_what_it_changes(runs: Runs, capsys: pytest.CaptureFixture) -> None:
    output, _, _ = _extended(runs, Schedule.LINEAR)
    config = cli_train.configure({"output": str(output), "steps": 10, "decay_steps": 10}, resume=True)
    assert (config.steps, config.decay_steps) == (10, 10)
    assert "steps 1-6 keep the rates they ran with" in " ".join(capsys.readouterr().err.split())
    assert yaml.safe_load((output / "run-config.yaml").read_text())["decay_steps"] == 4  # saved resolved, kept


def test_early_stop_keeps_the_best_and_writes_final_from_it(runs: Runs) -> None:
    output, summary, _ = runs.trained("early", *EARLY, "--steps", "12")
    evals = [(step, loss) for step, _, _, loss in _records(output) if loss is not None and step > 0]
    best_step, best_loss = min(evals, key=lambda item: item[1])  # the earliest of the lowest
    stop = evals[-1][0]
    assert len(evals) - 1 - evals.index((best_step, best_loss)) == 2, evals  # --early-stop-patience 2 evals after it
    assert (summary["status"], summary["step"]) == ("early-stopped", stop) and stop < 12, evals
    assert _records(output)[-1][0] == stop  # no step after it
    best = output / "checkpoints" / f"step-{best_step:08d}"
    assert (summary["best_step"], summary["best_eval_loss"], summary["best_checkpoint"]) == (best_step, best_loss,
                                                                                              str(best))
    assert _kept(output) == [best.name, f"step-{stop:08d}"]  # --keep-checkpoints 1 and the best, never rotated out
    assert _equal(_weights(output / "final"), _weights(best))
    assert not _equal(_weights(output / "final"), _weights(output / "checkpoints" / f"step-{stop:08d}"))


def test_early_stop_and_best_survive_resume(runs: Runs, env: dict[str, str]) -> None:
    """A run that finished 3 steps in (its eval history saved in the checkpoint), extended: it stops where the
    run never stopped does, with the same best; resumed once more, it stays stopped."""
    reference, expected, _ = runs.trained("early", *EARLY, "--steps", "12")
    output, summary, _ = runs.trained("early-resumed", *EARLY, "--steps", "3", then=("--steps", "12"))
    assert [summary[key] for key in ("status", "step", "best_step", "best_eval_loss")] == \
        [expected[key] for key in ("status", "step", "best_step", "best_eval_loss")]
    assert _records(output) == _records(reference)
    assert _equal(_weights(output / "final"), _weights(reference / "final"))
    again, _ = _invoke(env, "run", "--resume", "--output", output)
    assert (again["status"], again["step"]) == ("early-stopped", expected["step"])


@pytest.mark.parametrize("option", [{"keep_best": True}, {"early_stop_patience": 3}])
def test_keep_best_and_early_stop_need_validation(option: dict) -> None:
    name = "--" + next(iter(option)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"{name} compares eval losses, so it needs a validation set: add "
                                          "--val-fraction, --val-file or --val-split"):
        RunConfig(model="m", dataset="d", **option)


@pytest.mark.parametrize("schedule", list(Schedule), ids=[s.value for s in Schedule])
def test_the_rate_is_a_function_of_the_step_and_the_horizon(schedule: Schedule) -> None:
    """The rule in its own terms: a longer run with the original horizon has the original rates, then --min-lr."""
    original = LearningRate(1.0, total_steps=10, warmup_steps=2, schedule=schedule, min_lr=0.1)
    longer = LearningRate(1.0, total_steps=15, warmup_steps=2, schedule=schedule, min_lr=0.1, decay_steps=10)
    assert [longer(step) for step in range(1, 11)] == [original(step) for step in range(1, 11)]
    assert [longer(step) for step in range(11, 16)] == [1.0 if schedule is Schedule.CONSTANT else 0.1] * 5
