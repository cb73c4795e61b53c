"""Option parsing, in process with typer's CliRunner: help pages, config files under flags, usage errors, and the
config a resumed run continues with. `prepare` is replaced by a probe that records the config it is given, so
nothing here trains. Also the console script's own handling: usage errors on one line, Ctrl-C while importing."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cli_support import FINETUNE
from typer.testing import CliRunner

from finetune.cli import train as cli_train
from finetune.cli.checkpoints import MANIFEST, RUN_CONFIG
from finetune.cli.config import ConfigError, RunConfig, field_help
from finetune.cli.data import Format, Template, TextUnit
from finetune.cli.errors import FinetuneError
from finetune.cli.main import app, run_script
from finetune.cli.schedule import Schedule
from finetune.offload import CHECKSUMS_FILE, ClipMode, checksum_file, checksum_json

runner = CliRunner()


@pytest.mark.parametrize(("command", "expected"), [
    ([], ["run", "export", "info"]),
    (["run"], ["--seq-len", "--val-fraction", "--memory", "--nvme", "--resume", "--config", "--lora-targets", "--qlora",
               "--columns", "--template", "--text-unit", "--dataset-config", "--split", "--val-split", "Examples"]),
    (["export"], ["checkpoint", "--dtype", "--merge", "--base", "Example"]),
    (["info"], ["--path", "--bandwidth", "Example"]),
])
def test_help_renders(command: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


def test_every_option_has_help() -> None:
    assert set(field_help(RunConfig)) == {field.name for field in dataclasses.fields(RunConfig)}


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """Configs that `finetune run` got as far as preparing; the run then stops with exit code 1."""
    seen: list[RunConfig] = []

    def prepare(config: RunConfig, *, resume: bool, checkpoint: str | None) -> None:
        seen.append(config)
        raise FinetuneError("probe")

    monkeypatch.setattr(cli_train, "prepare", prepare)
    return seen


def test_flags_override_the_config_file(probe: list[RunConfig], tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("model: ./m\ndataset: d.jsonl\nseq_len: 64\nlr: 0.1\npack: true\n"
                                       "schedule: linear\n")
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml"), "--lr", "0.01", "--format", "chat",
                                 "--memory", "8GB", "--clip-mode", "per-block", "--no-pack"])
    assert result.exit_code == 1 and "Error: probe" in result.output
    config = probe[0]
    assert (config.model, config.dataset, config.seq_len, config.lr) == ("./m", "d.jsonl", 64, 0.01)
    assert (config.format, config.schedule, config.clip_mode, config.pack) == (Format.CHAT, Schedule.LINEAR,
                                                                              ClipMode.PER_BLOCK, False)
    assert config.memory == "8GB" and config.steps is None and config.output == "finetune-out"


def test_data_options_from_flags_and_a_config_file(probe: list[RunConfig], tmp_path: Path) -> None:
    """--columns is NAME=COLUMN text on the command line, and text or a mapping in a config file; it is saved as the
    text, so run-config.yaml reads back to the same config."""
    (tmp_path / "run.yaml").write_text("model: m\ndataset: d\ncolumns:\n  prompt: question\n  completion: answer\n"
                                       "text_unit: paragraph\ndataset_config: easy\n")
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml"), "--template", "alpaca", "--split",
                                 "dev", "--val-split", "test"])
    assert result.exit_code == 1, result.output
    config = probe[0]
    assert (config.columns, config.template, config.text_unit) == ("prompt=question,completion=answer",
                                                                   Template.ALPACA, TextUnit.PARAGRAPH)
    assert (config.dataset_config, config.split, config.val_split) == ("easy", "dev", "test")
    assert RunConfig(**yaml.safe_load(config.to_yaml())) == config
    defaults = RunConfig(model="m", dataset="d")
    assert (defaults.columns, defaults.template, defaults.text_unit, defaults.split) == (None, Template.AUTO,
                                                                                         TextUnit.DOCUMENT, "train")


def test_toml_config_with_dashed_names(probe: list[RunConfig], tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('model = "m"\ndataset = "d"\nseq-len = 128\nwarmup-steps = 5\n')
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "run.toml")])
    assert result.exit_code == 1
    assert (probe[0].seq_len, probe[0].warmup_steps) == (128, 5)


@pytest.mark.parametrize(("args", "config_text", "message"), [
    (["m", "d", "--steps", "3", "--epochs", "1"], None, "--steps and --epochs both given"),
    (["m", "d", "--val-fraction", "1.5"], None, "--val-fraction 1.5 must be in [0, 1)"),
    (["m", "d", "--memory", "lots"], None, "--memory 'lots' is not a size"),
    (["m", "d", "--format", "tweets"], None, "tweets"),
    (["m", "d", "--steps", "many"], None, "Invalid value for '--steps'"),
    ([], None, "MODEL is missing"),
    (["m", "d", "--lora", "--lora-rank", "0", "--lora-alpha", "-1", "--lora-dropout", "1"], None,
     "--lora-rank 0 must be >= 1; --lora-alpha -1.0 must be > 0; --lora-dropout 1.0 must be in [0, 1)"),
    (["m", "d", "--qlora", "--optimizer", "mezo"], None, "--optimizer mezo cannot train LoRA adapters"),
    (["m", "d", "--storage-dtype", "bf16"], None, "--storage-dtype bf16 needs --optimizer mezo"),
    (["m", "d", "--optimizer", "mezo", "--dtype", "bfloat16"], None,
     "--dtype bfloat16 cannot be used with --optimizer mezo (it perturbs and updates the weights as they compute, in "
     "float32); drop --dtype, or pass --storage-dtype bf16"),
    (["m", "d", "--storage-dtype", "bfloat16"], None, "'bfloat16' is not one of 'fp32', 'bf16'"),
    (["m", "d", "--lora-rank", "8"], None, "--lora-rank 8 has no effect without --lora; add --lora"),
    (["m", "d"], "lora: true\nlora_targets: ' , '\n", "--lora-targets is empty"),
    (["m", "d"], "lr: fast\n", "--lr 'fast': expected float"),
    (["m", "d"], "- a list\n", "expected a mapping"),
    (["m", "d", "--lr", "nan"], None, "--lr nan must be a finite number"),
    (["m", "d", "--lr", "inf", "--min-lr", "-inf", "--epochs", "inf"], None,
     "--epochs inf must be a finite number; --lr inf must be a finite number; --min-lr -inf must be a finite number"),
    (["m", "d", "--lora", "--lora-alpha", "nan", "--lora-dropout", "nan"], None,
     "--lora-alpha nan must be a finite number; --lora-dropout nan must be a finite number"),
    (["m", "d", "--columns", "prompt=question,answer"], None,
     "--columns 'prompt=question,answer': 'answer' is not NAME=COLUMN; give NAME=COLUMN pairs such as "
     "prompt=question,completion=answer"),
    (["m", "d"], "columns: {question: prompt}\n", "--columns 'question=prompt': 'question' is not a field of any "
     "format (those are text, prompt, completion, instruction, input, output, messages)"),
    (["m", "d", "--val-split", "test", "--val-file", "v.jsonl"], None, "--val-split and --val-file both given"),
    (["m", "d", "--val-split", "test", "--val-fraction", "0.1"], None, "--val-split and --val-fraction both given"),
    (["m", "d", "--val-split", "train"], None, "--val-split train is the split trained on (--split)"),
    (["m", "d", "--split", " "], None, "--split is empty"),
    (["m", "d", "--template", "vicuna"], None, "'vicuna' is not one of 'auto', 'chat', 'alpaca'"),
    (["m", "d", "--text-unit", "sentence"], None, "'sentence' is not one of 'document', 'line', 'paragraph'"),
    (["m", "d"], "val_fraction: .nan\nweight_decay: .inf\nmax_grad_norm: .nan\n",
     "--val-fraction nan must be a finite number; --weight-decay inf must be a finite number; --max-grad-norm nan "
     "must be a finite number"),
])
def test_usage_errors_exit_2(probe: list[RunConfig], tmp_path: Path, args: list[str], config_text: str | None,
                             message: str) -> None:
    if config_text is not None:
        (tmp_path / "run.yaml").write_text(config_text)
        args = [*args, "--config", str(tmp_path / "run.yaml")]
    result = runner.invoke(app, ["run", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert probe == []


@pytest.mark.parametrize(("args", "message"), [
    (["run", "m", "d", "--no-such-option"], "Error: No such option: --no-such-option"),
    (["run", "m", "d", "--lr", "nan", "--max-grad-norm", "inf"],
     "Error: Invalid value: --lr nan must be a finite number; --max-grad-norm inf must be a finite number (see "
     "'finetune run --help')"),
    (["run", "m", "d", "--steps", "many"], "Error: Invalid value for '--steps': "),
    (["export"], "Error: Missing argument 'checkpoint' (see 'finetune export --help')"),
])
def test_script_prints_usage_errors_on_one_line(probe: list[RunConfig], capsys: pytest.CaptureFixture[str],
                                                args: list[str], message: str) -> None:
    """What the installed script prints (run_script is its body): one `Error:` line, last, as for exit code 1."""
    assert run_script(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(message) and stderr.count("\n") == 1 and "─" not in stderr, stderr
    assert probe == []


def test_script_exit_codes(probe: list[RunConfig], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script(["run", "--help"]) == 0 and "--seq-len" in capsys.readouterr().out
    assert run_script(["run", "m", "d"]) == 1 and capsys.readouterr().err == "Error: probe\n"
    assert run_script([]) == 2 and "run" in capsys.readouterr().out  # bare `finetune`: the help, as typer gives it


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
def test_ctrl_c_while_importing_exits_130_without_a_traceback() -> None:
    """Importing torch takes seconds (a command imports it, not the help: cli/startup.py); a Ctrl-C then must end
    like any other stop: one line, exit 130. The signal is sent once torch's library is mapped into the process,
    so it lands inside the import, whatever the machine's speed."""
    process = subprocess.Popen([FINETUNE, "info", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text():
        time.sleep(0.005)
    assert process.poll() is None, "the script finished before torch was loaded"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines() == ["Stopped by Ctrl-C before the run started; nothing was written."], stderr
    assert stdout == ""  # it stopped before --help was printed: the signal came while importing


def _saved_run(output: Path, config: RunConfig) -> None:
    """A run directory whose latest checkpoint holds `config`, with a manifest as `finetune run` leaves it (sizes
    and checksums: cli/checkpoints.py refuses a checkpoint without them)."""
    directory = output / "checkpoints" / "step-00000004"
    directory.mkdir(parents=True)
    (directory / RUN_CONFIG).write_text(config.to_yaml())
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"files": {}}))  # the engine's files: none here
    names = [RUN_CONFIG, CHECKSUMS_FILE]
    listed = [{"name": directory.name, "step": 4, "files": {n: (directory / n).stat().st_size for n in names},
               "checksums": {n: checksum_file(directory / n) for n in names}}]
    (output / "checkpoints" / MANIFEST).write_text(json.dumps({"checkpoints": listed,
                                                               "checksum": checksum_json(listed)}))


def test_resume_continues_with_the_saved_config(tmp_path: Path) -> None:
    output = tmp_path / "run"
    _saved_run(output, RunConfig(model="m", dataset="d", lr=0.5, seq_len=32, output=str(output)))
    config = cli_train.configure({"output": str(output), "nvme": "/fast", "checkpoint_every": 7}, resume=True)
    assert (config.model, config.lr, config.seq_len, config.nvme, config.checkpoint_every) == ("m", 0.5, 32, "/fast", 7)
    with pytest.raises(FinetuneError, match=r"--seq-len 64 \(checkpoint: 32\)"):
        cli_train.configure({"output": str(output), "seq_len": 64}, resume=True)
    with pytest.raises(FinetuneError, match=r"--lora True \(checkpoint: False\)"):
        cli_train.configure({"output": str(output), "lora": True}, resume=True)
    for name, value in [("columns", "text=body"), ("template", "alpaca"), ("text_unit", "line"),
                        ("dataset_config", "easy"), ("split", "dev"), ("val_split", "test"), ("format", "text")]:
        with pytest.raises(FinetuneError, match=f"--{name.replace('_', '-')} "):  # they change the data
            cli_train.configure({"output": str(output), name: value}, resume=True)


def test_resume_refuses_changed_lora_settings(tmp_path: Path) -> None:
    output = tmp_path / "run"
    _saved_run(output, RunConfig(model="m", dataset="d", qlora=True, lora_rank=8, output=str(output)))
    config = cli_train.configure({"output": str(output)}, resume=True)
    assert (config.lora, config.qlora, config.lora_rank, config.lora_alpha) == (True, True, 8, 16.0)
    with pytest.raises(FinetuneError, match=r"--lora-alpha 8.0 \(checkpoint: 16.0\)"):
        cli_train.configure({"output": str(output), "lora_alpha": 8}, resume=True)


def test_config_round_trips_through_yaml() -> None:
    for config in (RunConfig(model="m", dataset="d", format=Format.CHAT, steps=10, memory="1GB"),
                   RunConfig(model="m", dataset="d", qlora=True, lora_targets="q_proj,v_proj")):
        assert RunConfig(**yaml.safe_load(config.to_yaml())) == config
    with pytest.raises(ConfigError, match="--seq-len 1 must be >= 2; --keep-checkpoints -1 must be >= 0"):
        RunConfig(model="m", dataset="d", keep_checkpoints=-1, seq_len=1)
    with pytest.raises(ConfigError, match="--prefetch -1 must be >= 0"):
        RunConfig(model="m", dataset="d", prefetch=-1)


def test_info_reports_disk_speed_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path.parent / "cache"))  # --bandwidth stores the rates there
    result = runner.invoke(app, ["info", "--path", str(tmp_path), "--bandwidth", "--bandwidth-size", "4MB", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the JSON alone: notes (such as rates measured on a busy machine) go to stderr
    assert {"cpu cores", f"disk free at {tmp_path}", f"disk write at {tmp_path}",
            f"disk read at {tmp_path}", f"disk time compute hides at {tmp_path}"} <= set(rows)
    assert not any(tmp_path.iterdir())  # the test file is removed
