"""What a run shows and records, in process: metrics.jsonl across a restart, the plain log lines without a terminal,
the loss plot (its smoothing, its panels, its temporary files)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from finetune.cli.progress import MetricsLog, RunProgress, ema, perplexity, plot_losses


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log(path: Path, records: list[dict], *, resume_step: int | None = None) -> None:
    metrics = MetricsLog(path, resume_step=resume_step)
    for record in records:
        metrics.write(record)
    metrics.close()


def test_a_new_run_starts_metrics_empty(tmp_path: Path) -> None:
    """A start killed before its first checkpoint left its step-0 eval (and a few steps); running the same command
    again writes the step-0 eval again, so it must not be there twice."""
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": 4.0}], resume_step=0)
    _log(path, [{"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": 4.0}], resume_step=0)
    assert _records(path) == [{"step": 0, "eval_loss": 5.0}, {"step": 1, "loss": 4.0}]


def test_resume_keeps_the_records_up_to_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 0, "eval_loss": 5.0}] + [{"step": s, "loss": 4.0} for s in (1, 2, 3)]
         + [{"step": 2, "eval_loss": 3.0}])
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a line cut short by the kill
    _log(path, [{"step": 3, "loss": 2.0}], resume_step=2)
    assert [(r["step"], "eval_loss" in r) for r in _records(path)] == [(0, True), (1, False), (2, False), (2, True),
                                                                       (3, False)]


def test_plot_removes_what_a_killed_write_left(tmp_path: Path) -> None:
    """write_atomic's temporary file survives a kill -9 during the write; the next plot of this run removes it,
    and nothing else (another file's temporary, another directory's)."""
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 2, "eval_loss": 3.5}])
    left = tmp_path / ".loss.png.k1ll3d.tmp"
    others = [tmp_path / ".run-config.yaml.abc.tmp", tmp_path / "elsewhere" / ".loss.png.abc.tmp"]
    for file in (left, *others):
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"partial")
    plot_losses(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not left.exists() and all(file.exists() for file in others)
    assert not list(tmp_path.glob(".loss.png.*"))


def _progress(terminal: bool, *, quiet: bool = False) -> tuple[RunProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    return RunProgress(console, total=7, start=0, quiet=quiet, log_every=3), out


def test_plain_lines_every_log_every_steps_without_a_terminal() -> None:
    progress, out = _progress(terminal=False)
    with progress:
        for step in range(1, 8):
            progress.update(step, 2.0 / step, 100.0, "device 1 B", 1e-3)
    lines = out.getvalue().splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["step 3/7", "step 6/7"]
    assert lines[0].startswith("step 3/7 · loss 0.6667 · lr 0.001 · 100 tok/s · ETA 0:00:00 · device 1 B")


@pytest.mark.parametrize(("terminal", "quiet"), [(True, False), (False, True)], ids=["terminal", "json"])
def test_no_plain_lines_on_a_terminal_or_with_json(terminal: bool, quiet: bool) -> None:
    """A terminal has the bar; --json keeps stdout for its summary."""
    progress, out = _progress(terminal, quiet=quiet)
    with progress:
        for step in range(1, 8):
            progress.update(step, 1.0, 100.0, "", 1e-3)
    assert "tok/s · ETA" not in out.getvalue()


def test_ema_is_debiased_and_smooths() -> None:
    """Reference: the closed form of a debiased EMA (Adam's first moment), beta 0.9."""
    values = [4.0, 2.0, 3.0, 1.0]
    expected = [sum(0.1 * 0.9 ** (t - i) * values[i] for i in range(t + 1)) / (1 - 0.9 ** (t + 1))
                for t in range(len(values))]
    assert ema(values) == pytest.approx(expected, rel=1e-12)
    assert ema([2.5] * 5) == pytest.approx([2.5] * 5, rel=1e-12) and ema(values)[0] == 4.0


def test_perplexity_is_exp_of_the_loss() -> None:
    assert perplexity(2.0) == math.exp(2.0) and perplexity(1e4) == math.inf


def test_plot_has_a_title_and_an_lr_panel(tmp_path: Path) -> None:
    import matplotlib.image

    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 0, "eval_loss": 5.0}]
         + [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3 * s} for s in range(1, 9)])
    plot_losses(path, tmp_path / "loss.png", title="tiny: 8 of 8 steps")
    height, width, _ = matplotlib.image.imread(tmp_path / "loss.png").shape
    assert height > width * 0.7  # two panels stacked: taller than the one-panel plot (7 x 4 inches)
