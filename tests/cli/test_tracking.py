"""--report-to and the plain log lines: one short run through the installed script writes every target offline, and
each is read back with its library's own reader (TensorBoard's EventAccumulator, MLflow's client on the file store,
the csv module; wandb has no Python reader of its offline files any more, so the test reads the .wandb file's
LevelDB-log records itself and parses them with wandb's own protobuf). The reference is metrics.jsonl of the same
run: every target must hold its values at its steps. The errors (an unknown target, a library missing) are checked
in process, where nothing trains."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import sys
from pathlib import Path

import pytest
from cli_support import Tiny, run_finetune

from finetune.cli.main import run_script
from finetune.cli.tracking import Tracking

STEPS, LOG_EVERY, EVAL_EVERY = 6, 2, 3


@pytest.fixture(scope="module")
def tracked_run(tiny: Tiny, learnable: Path, env: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[dict]]:
    """A run of STEPS steps with all four targets, its stdout captured (not a terminal): its output directory,
    stdout, and metrics.jsonl's records."""
    output = tmp_path_factory.mktemp("tracked") / "run"
    result = run_finetune(env, "run", tiny.model, learnable, "--output", output, "--steps", STEPS, "--batch-size", 4,
                          "--seq-len", 24, "--lr", "1e-2", "--val-fraction", "0.1", "--eval-every", EVAL_EVERY,
                          "--checkpoint-every", 0, "--report-to", "tensorboard,wandb,mlflow,csv",
                          "--log-every", LOG_EVERY, *tiny.budget_flags(output.parent / "swap"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return output, result.stdout, records


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in metrics.jsonl: the reference each target is compared with."""
    return [(r["step"], r[key]) for r in records if key in r]


def _assert_same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float,
                        key: str) -> None:
    """The same steps, and values equal within `rel` (TensorBoard stores float32)."""
    assert [step for step, _ in logged] == [step for step, _ in expected], key
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=rel), key


def test_metrics_hold_perplexity_and_memory(tracked_run) -> None:
    _, stdout, records = tracked_run
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12) for r in evals)
    assert f"eval loss {evals[-1]['eval_loss']:.4f} · perplexity {evals[-1]['eval_perplexity']:.2f}" in stdout
    steps = [r for r in records if "loss" in r]
    assert all(r.keys() >= {"lr", "grad_norm", "tokens_per_s", "device_bytes", "host_bytes", "nvme_read",
                            "nvme_written"} for r in steps)
    assert all(r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["host_bytes"] > 0 and steps[-1]["nvme_read"] > 0  # the budget is below the state


def test_plain_lines_every_log_every_steps_without_a_terminal(tracked_run) -> None:
    _, stdout, _ = tracked_run
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and " tok/s · ETA " in line]
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    assert all(" · loss " in line and " · lr " in line and "device " in line and "nvme r " in line for line in lines)


def test_summary_shows_wall_and_step_time_and_perplexity(tracked_run) -> None:
    _, stdout, _ = tracked_run
    for row in ("eval loss", "eval perplexity", "wall seconds", "train seconds", "step seconds"):
        assert row in stdout, row


def test_tensorboard_event_files(tracked_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _, records = tracked_run
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_perplexity", "tokens_per_s", "device_bytes",
                "nvme_read"):
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        _assert_same_series(logged, _series(records, key), 1e-6, key)


def test_mlflow_file_store(tracked_run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this
    from mlflow.tracking import MlflowClient

    output, _, records = tracked_run
    client = MlflowClient(tracking_uri=(output / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.01" and run.data.params["steps"] == "6"
    for key in ("loss", "eval_perplexity", "host_bytes"):
        history = sorted((metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key))
        _assert_same_series(history, _series(records, key), 1e-12, key)


def test_csv_rows_are_the_records(tracked_run) -> None:
    output, _, records = tracked_run
    with (output / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert {key: float(value) for key, value in row.items() if value} == pytest.approx(record, rel=1e-12)


def test_wandb_offline_run(tracked_run) -> None:
    output, _, records = tracked_run
    (run,) = (output / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")
    history = _wandb_history(log)  # one row per step: an eval's values join its step's train values
    for key in ("loss", "lr", "nvme_written", "eval_perplexity"):
        logged = [(row["_step"], row[key]) for row in history if key in row]
        _assert_same_series(logged, _series(records, key), 1e-12, key)


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log records
    (32 KiB blocks; each record a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) holding wandb's
    `Record` protobufs, as wandb's former Python datastore read them."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_csv_resumes_at_the_checkpoint_and_widens_for_new_fields(tmp_path: Path) -> None:
    """A resumed run keeps the CSV rows up to its checkpoint's step (a last row cut short by a kill is dropped, as
    in metrics.jsonl), and a field first seen later adds its column to every row."""
    with Tracking(["csv"], tmp_path, {}, 0) as tracking:
        for step in (1, 2, 3):
            tracking.log({"step": step, "loss": 4.0 - step})
    path = tmp_path / "metrics.csv"
    path.write_text(path.read_text() + "4,0.")  # killed mid-row
    with Tracking(["csv"], tmp_path, {}, 2) as tracking:
        tracking.log({"step": 3, "loss": 0.5})
        tracking.log({"step": 3, "eval_loss": 0.7})
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows == [{"step": "1", "loss": "3.0", "eval_loss": ""}, {"step": "2", "loss": "2.0", "eval_loss": ""},
                    {"step": "3", "loss": "0.5", "eval_loss": ""}, {"step": "3", "loss": "", "eval_loss": "0.7"}]


def test_unknown_report_to_is_one_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script(["run", "m", "d", "--report-to", "tensorboard,comet"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("Error: ") and "--report-to 'tensorboard,comet'" in stderr
    assert "unknown comet" in stderr and "tensorboard, wandb, mlflow, csv" in stderr


def test_a_missing_library_stops_before_anything_is_written(tiny: Tiny, learnable: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec then finds no wandb
    output = tmp_path / "run"
    args = ["run", str(tiny.model), str(learnable), "--output", str(output), "--report-to", "csv,wandb"]
    assert run_script(args) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("Error: --report-to wandb needs the wandb package"), stderr
    assert "pip install 'finetune[track]'" in stderr
    assert not output.exists()


def test_resume_continues_each_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed process (checkpoint at step 2) continues what the first one wrote: TensorBoard hides the first
    process's step 3 behind the second's, and wandb and MLflow continue the same run (README: Tracking)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    targets = ["tensorboard", "wandb", "mlflow", "csv"]
    with Tracking(targets, tmp_path, {"lr": 0.1}, 0) as tracking:
        for step in (1, 2, 3):
            tracking.log({"step": step, "loss": 4.0 - step})
    with Tracking(targets, tmp_path, {"lr": 0.1, "memory": "8GB"}, 2) as tracking:
        tracking.log({"step": 3, "loss": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(1, 3.0), (2, 2.0), (3, 0.5)]
    # offline-run-<time>-<run id>, with "-1" after it when the second process starts within the same second
    runs = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)", path.name)[1]
            for path in (tmp_path / "wandb").glob("offline-run-*")}
    assert len(runs) == 1, runs
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    history = {(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "loss")}
    assert history == {(1, 3.0), (2, 2.0), (3, 1.0), (3, 0.5)}  # step 3 twice: MLflow cannot hide the first
