"""What a run shows and records: a live progress bar (or plain log lines), metrics.jsonl, a summary table, a loss
curve.

The progress bar is for a person watching; without a terminal (nohup, SLURM, CI logs) a plain line every
--log-every steps takes its place. metrics.jsonl (one JSON object per step or eval, flushed as
written) is for scripts and for the plot, and survives a crash. On resume it is cut back to the checkpoint's
step, so it always describes a single run.
"""

from __future__ import annotations

import datetime
import glob
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..offload import format_bytes, write_atomic
from .tracking import Tracking

__all__ = ["Clock", "MetricsLog", "RunProgress", "ema", "memory_line", "memory_record", "perplexity", "plot_losses",
           "summary_table"]


class Clock:
    """Tokens, steps and seconds spent in train_step by this process: the tokens/s of the bar, metrics.jsonl and
    the summary, and its step time (evals and checkpoints are outside it)."""

    def __init__(self) -> None:
        self.tokens, self.steps, self.elapsed = 0, 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.steps += 1
        self.elapsed += seconds

    @property
    def step_seconds(self) -> float:
        return self.elapsed / self.steps if self.steps else 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0


class MetricsLog:
    """Appends JSON lines to `path`, keeping only the records up to `resume_step` from an earlier run, and passes
    each record on to `tracking` (the --report-to targets), so that every target sees what metrics.jsonl holds.

    `resume_step` 0 (a new run) keeps none: what is there was left by a start killed before its first checkpoint,
    and this run writes its step-0 eval again, so keeping it would log that eval twice.
    """

    def __init__(self, path: Path, *, resume_step: int | None = None, tracking: Tracking | None = None) -> None:
        self.path = path
        self._tracking = tracking
        if resume_step is not None and path.exists():
            kept = [r for r in _read_metrics(path) if r["step"] <= resume_step] if resume_step > 0 else []
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished
        if self._tracking is not None:
            self._tracking.log(record)

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

    The bar is drawn only on a terminal; in a log file it would be one truncated line, so there a plain line
    (step, loss, lr, tokens/s, ETA, memory) is printed every `log_every` steps instead (0: none). `quiet` (--json)
    drops the lines and notes, leaving stdout to the JSON summary.
    """

    def __init__(self, console: Console, *, total: int, start: int, quiet: bool, log_every: int = 0) -> None:
        self.quiet = quiet
        self._total, self._start = total, start
        self._log_every = log_every if not quiet and not console.is_terminal else 0
        self._started = time.monotonic()  # for the ETA of the plain lines
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

    def update(self, step: int, loss: float, tokens_per_s: float, memory: str, lr: float) -> None:
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{tokens_per_s:,.0f}", memory=memory)
        if self._log_every and step % self._log_every == 0:
            self._bar.console.print(f"step {step}/{self._total} · loss {loss:.4f} · lr {lr:.3g} · "
                                    f"{tokens_per_s:,.0f} tok/s · ETA {self._eta(step)} · {memory}",
                                    highlight=False, soft_wrap=True)

    def _eta(self, step: int) -> str:
        """The steps left at this process's wall time per step so far (its evals and checkpoints included)."""
        per_step = (time.monotonic() - self._started) / max(step - self._start, 1)
        return str(datetime.timedelta(seconds=round(per_step * (self._total - step))))

    def note(self, message: str) -> None:
        """A line above the bar (eval results, checkpoints)."""
        if not self.quiet:
            self._bar.console.print(message, highlight=False)


def perplexity(loss: float) -> float:
    """exp(per-token mean loss), reported beside the eval loss; inf where exp overflows a float."""
    return math.inf if loss >= _LARGEST_EXPONENT else math.exp(loss)


_LARGEST_EXPONENT = math.log(sys.float_info.max)


def memory_record(engine: Any) -> dict[str, int]:
    """Bytes in use per tier now, and NVMe bytes read and written so far: the memory fields of metrics.jsonl."""
    resident, stats = engine.resident_bytes(), engine.stats()
    return {"device_bytes": resident["device"], "host_bytes": resident["host"], "nvme_read": stats["bytes_read"],
            "nvme_written": stats["bytes_written"]}


def memory_line(engine: Any) -> str:
    """Bytes in use per tier now, and NVMe traffic so far."""
    memory = memory_record(engine)
    return (
        f"device {format_bytes(memory['device_bytes'])} · host {format_bytes(memory['host_bytes'])} · "
        f"nvme r {format_bytes(memory['nvme_read'])} w {format_bytes(memory['nvme_written'])}"
    )


def summary_table(summary: dict[str, Any]) -> Table:
    """The final summary as a two-column table."""
    table = Table(title="finetune run", show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _show(key, value))
    return table


def _show(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "step_seconds":
            return f"{value:.3f}"
        return f"{value:,.1f}" if key.endswith(("per_s", "seconds")) else f"{value:.4f}"
    if isinstance(value, int) and key.startswith(("peak_", "nvme_")):
        return format_bytes(value)
    return str(value)


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with the start debiased (as Adam's moments are), so the first points are not
    pulled toward 0: the smoothed train curve of the plot (TensorBoard's smoothing)."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta**count))
    return smoothed


def plot_losses(metrics: Path, png: Path, *, title: str = "") -> None:
    """Train loss per step (raw, and smoothed by `ema`) and eval loss, with the learning rate in a panel below,
    from metrics.jsonl, as a PNG.

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
    rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
    figure, (axes, lr_axes) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, label="train loss", linewidth=1, alpha=0.35, color="C0")
        axes.plot(steps, ema(list(losses)), label="train loss (smoothed)", linewidth=1.5, color="C0")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", color="C1")
    if rates:
        lr_axes.plot(*zip(*rates), linewidth=1, color="C2")
    if title:
        axes.set_title(title)
    axes.set_ylabel("loss")
    lr_axes.set_xlabel("step")
    lr_axes.set_ylabel("lr")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for panel in (axes, lr_axes):
        panel.grid(alpha=0.3)
    if train or evals:
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
