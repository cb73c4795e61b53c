"""Experiment tracking (--report-to): the run's metrics.jsonl records, sent as they are written to TensorBoard,
Weights & Biases, MLflow or a CSV file.

Every target writes under OUTPUT and works offline: TensorBoard event files in OUTPUT/tensorboard, a wandb offline
run in OUTPUT/wandb (`wandb sync` uploads it later), an MLflow file store in OUTPUT/mlruns (`mlflow ui
--backend-store-uri OUTPUT/mlruns`), and OUTPUT/metrics.csv. The metrics keep metrics.jsonl's names and its step.
The libraries are optional (`pip install 'finetune[track]'`) and each is imported only when its target is chosen.
`check_installed` runs before anything is written, so a missing one stops the run with nothing to clean up.

A resumed run continues what its first process wrote, as metrics.jsonl does: the CSV keeps its rows up to the
checkpoint's step, TensorBoard hides the later events (its purge step), and the wandb and MLflow runs are
continued under their ids (their history may then hold a step twice: the steps after the checkpoint, run again).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ..offload import write_atomic
from .errors import FinetuneError

__all__ = ["TARGETS", "Tracking", "check_installed", "parse_targets"]

TARGETS = ("tensorboard", "wandb", "mlflow", "csv")
"""The --report-to names, in the order --help lists them."""

_INSTALL = "pip install 'finetune[track]'"

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The import each target needs (csv is the standard library's)."""


def parse_targets(value: str | None) -> list[str]:
    """The names in a --report-to value (comma-separated, duplicates dropped); [] for None or "none".

    Raises:
        ValueError: unknown names, listed (the config turns it into its error line).
    """
    names = [name.strip().lower() for name in (value or "").split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}")
    return list(dict.fromkeys(names))


def check_installed(targets: list[str]) -> None:
    """Refuse targets whose library is missing, before the run writes anything.

    Raises:
        FinetuneError: the targets and the package to install.
    """
    missing = [name for name in targets if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None]
    if missing:
        raise FinetuneError(f"--report-to {','.join(missing)} needs the {' and '.join(missing)} package"
                            f"{'s' if len(missing) > 1 else ''}: {_INSTALL}, or drop {','.join(missing)} from "
                            "--report-to")


class _Tracker(Protocol):
    """One target: `log` gets a record without its step, `close` ends the run (failed: by an exception)."""

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


class Tracking:
    """All the --report-to targets of one run behind one `log` (a no-op with none).

    Args:
        targets: names from `parse_targets`.
        output: the run directory; every target writes below it.
        params: the effective config (`RunConfig.to_dict()`), recorded as the run's parameters.
        resume_step: the checkpoint's step on --resume, 0 for a new run (what metrics.jsonl keeps).
    """

    def __init__(self, targets: list[str], output: Path, params: dict[str, Any], resume_step: int) -> None:
        makers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "csv": _Csv}
        self._trackers: list[_Tracker] = []
        try:
            for name in targets:
                self._trackers.append(makers[name](output, params, resume_step))
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=kind is not None)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (it holds its "step")."""
        values = {key: value for key, value in record.items() if key != "step"}
        for tracker in self._trackers:
            tracker.log(values, int(record["step"]))

    def close(self, failed: bool = False) -> None:
        """Flush and finish every target; `failed` marks the run failed where the target records that."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close(failed)


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a record: what a scalar tracker takes (text and inf are left to the CSV)."""
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class _TensorBoard:
    """Event files in OUTPUT/tensorboard, through torch's SummaryWriter."""

    def __init__(self, output: Path, params: dict[str, Any], resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events of an earlier process at steps this one runs again are hidden (a new run: all of them).
        self._writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=resume_step + 1 if resume_step
                                     else 0)
        if not resume_step:
            self._writer.add_text("config", "\n".join(f"    {key}: {value}" for key, value in params.items()), 0)

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in _numbers(record).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a killed run keeps every step it logged, as metrics.jsonl does

    def close(self, failed: bool) -> None:
        self._writer.close()


class _Wandb:
    """A wandb offline run in OUTPUT/wandb; a resumed run continues the id of the newest one there."""

    def __init__(self, output: Path, params: dict[str, Any], resume_step: int) -> None:
        import wandb

        earlier = sorted((output / "wandb").glob("offline-run-*-*")) if resume_step else []
        run_id = earlier[-1].name.rsplit("-", 1)[1] if earlier else None
        # console="off": wandb must not wrap stdout, which carries the progress bar and the --json summary.
        self._run = wandb.init(mode="offline", dir=str(output), project="finetune", name=output.resolve().name,
                               id=run_id, resume="allow" if run_id else None, config=params,
                               settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict[str, Any], step: int) -> None:
        self._run.log(_numbers(record), step=step)

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


class _MLflow:
    """An MLflow run in a file store at OUTPUT/mlruns (experiment "finetune"); a resumed run continues the newest."""

    def __init__(self, output: Path, params: dict[str, Any], resume_step: int) -> None:
        # MLflow 3 keeps the file store behind this opt-out; it is the store that needs no server and no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self._client = MlflowClient(tracking_uri=(output / "mlruns").resolve().as_uri())
        experiment = self._client.get_experiment_by_name("finetune")
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment("finetune")
        runs = self._client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1) \
            if resume_step else []
        if runs:
            self._run_id = runs[0].info.run_id
            self._client.update_run(self._run_id, status="RUNNING")
        else:  # parameters are logged once: a resumed run may change where things are, which MLflow refuses
            self._run_id = self._client.create_run(experiment_id, run_name=output.resolve().name).info.run_id
            self._client.log_batch(self._run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log(self, record: dict[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, step) for key, value in _numbers(record).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, failed: bool) -> None:
        self._client.set_terminated(self._run_id, status="FAILED" if failed else "FINISHED")


class _Csv:
    """OUTPUT/metrics.csv: one row per record, a column per field (a train row leaves the eval columns empty).

    A field first seen later (the first eval) adds its column: the file is rewritten with the wider header.
    """

    def __init__(self, output: Path, params: dict[str, Any], resume_step: int) -> None:
        self._path = output / "metrics.csv"
        rows = self._rows() if resume_step and self._path.exists() else []
        self._columns = list(dict.fromkeys(key for row in rows for key in row)) or ["step"]
        self._rewrite([row for row in rows if _step(row) <= resume_step])

    def log(self, record: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: v for k, v in record.items() if not isinstance(v, (list, dict))}}  # not samples
        if not row.keys() <= set(self._columns):
            rows = self._rows()
            self._columns += [key for key in row if key not in self._columns]
            self._rewrite(rows)
        with self._path.open("a", newline="") as file:
            csv.DictWriter(file, self._columns).writerow(row)

    def close(self, failed: bool) -> None:
        """Nothing is held open: each row is written and closed (a killed run keeps its rows)."""

    def _rows(self) -> list[dict[str, str]]:
        """The rows written so far; a last row cut short by a kill (no line end yet) is dropped."""
        text = self._path.read_text()
        text = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        return [row for row in csv.DictReader(io.StringIO(text, newline="")) if _step(row) >= 0]

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self._columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self._path, text.getvalue())


def _step(row: dict[str, Any]) -> int:
    """A CSV row's step; -1 for a row cut short by a kill (no step to read)."""
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return -1
