"""What a run shows and records: a live progress bar, metrics.jsonl, a summary table, a loss curve.

The progress bar is for a person watching. metrics.jsonl (one JSON object per step or eval, flushed as
written) is for scripts and for the plot, and survives a crash. On resume it is cut back to the checkpoint's
step, so it always describes a single run.
"""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..offload import format_bytes, write_atomic

__all__ = ["Clock", "MetricsLog", "RunProgress", "memory_line", "plot_losses", "summary_table"]


class Clock:
    """Tokens and seconds spent in train_step by this process: the tokens/s of the bar, metrics.jsonl and the
    summary."""

    def __init__(self) -> None:
        self.tokens, self.elapsed = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.elapsed += seconds

    @property
    def rate(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0


class MetricsLog:
    """Appends JSON lines to `path`, keeping only the records up to `resume_step` from an earlier run.

    `resume_step` 0 (a new run) keeps none: what is there was left by a start killed before its first checkpoint,
    and this run writes its step-0 eval again, so keeping it would log that eval twice.
    """

    def __init__(self, path: Path, *, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [r for r in _read_metrics(path) if r["step"] <= resume_step] if resume_step > 0 else []
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished

    def close(self) -> None:
        self._file.close()


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunProgress:
    """A rich progress bar (step, loss, tokens/s, ETA, memory per tier) with notes above it.

    The bar is drawn only on a terminal; in a log file it would be one truncated line. `quiet` (--json) also
    drops the notes, leaving stdout to the JSON summary.
    """

    def __init__(self, console: Console, *, total: int, start: int, quiet: bool) -> None:
        self.quiet = quiet
        self._bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[memory]}"),
            console=console,
            disable=quiet or not console.is_terminal,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-", rate="-", memory="")

    def __enter__(self) -> RunProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float, memory: str) -> None:
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{tokens_per_s:,.0f}", memory=memory)

    def note(self, message: str) -> None:
        """A line above the bar (eval results, checkpoints)."""
        if not self.quiet:
            self._bar.console.print(message, highlight=False)


def memory_line(engine: Any) -> str:
    """Bytes in use per tier now, and NVMe traffic so far."""
    resident = engine.resident_bytes()
    stats = engine.stats()
    return (
        f"device {format_bytes(resident['device'])} · host {format_bytes(resident['host'])} · "
        f"nvme r {format_bytes(stats['bytes_read'])} w {format_bytes(stats['bytes_written'])}"
    )


def summary_table(summary: dict[str, Any]) -> Table:
    """The final summary as a two-column table."""
    table = Table(title="finetune run", show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _show(key, value))
    return table


def _show(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if key.endswith(("per_s", "seconds")) else f"{value:.4f}"
    if isinstance(value, int) and key.startswith(("peak_", "nvme_")):
        return format_bytes(value)
    return str(value)


def plot_losses(metrics: Path, png: Path) -> None:
    """Train loss per step and eval loss, from metrics.jsonl, as a PNG.

    The PNG is written atomically, through a `.loss.png.*.tmp` file beside it. A process killed during that write
    leaves the temporary file behind, so the leftovers of earlier writes of this same PNG are removed first (the
    run holds the output directory's lock: no other process is writing one).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = _read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    _remove_leftovers(png)
    write_atomic(png, buffer.getvalue())


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files an interrupted `write_atomic(path, ...)` left (named `.{name}.*.tmp`)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        leftover.unlink(missing_ok=True)
