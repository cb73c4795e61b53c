"""What a run records, in process: metrics.jsonl across a restart, and the loss plot's temporary files."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.cli.progress import MetricsLog, plot_losses


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
