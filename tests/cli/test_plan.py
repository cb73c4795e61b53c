"""`finetune plan` and `run --dry-run`, in process with typer's CliRunner: a run that fits, one that does not,
--json, a model directory with only config.json, hardware profiles (bundled and a JSON file), and a dry run that
writes nothing. Reference for the numbers: `offload.predict` itself (tests/offload/test_cost_model.py checks it
against a real engine); here only that the CLI reports them and refuses what cannot fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import Tiny
from typer.testing import CliRunner

from finetune.cli.main import app

runner = CliRunner()
CPU_PROFILE = "laptop-24gb-cpu"  # most tests use a profile: nothing is measured
SHAPE = ["--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Measured rates go to a temporary cache, never the user's."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "cache"


def _plan(*args: str | Path) -> object:
    return runner.invoke(app, ["plan", *map(str, args)])


def test_a_run_that_fits_on_this_machine(tiny: Tiny, tmp_path: Path, cache: Path) -> None:
    memory = str(2 * (tiny.device_bytes + tiny.host_bytes))
    result = _plan(tiny.model, *SHAPE, "--memory", memory, "--nvme", tmp_path / "swap", "--steps", "10")
    assert result.exit_code == 0, result.output
    for text in ("step time", "bottleneck", "peak RSS", "swap at", "is the minimum", "10 steps"):
        assert text in result.output
    assert (cache / "rates.json").is_file()  # measured once, cached
    assert not (tmp_path / "swap").exists()  # planning creates nothing at --nvme


def test_a_budget_below_the_minimum_is_refused_with_it(tiny: Tiny) -> None:
    result = _plan(tiny.model, "--memory", "1KB", "--hardware", CPU_PROFILE)
    assert result.exit_code == 1
    assert "below the minimum" in result.output and "raise --memory" in result.output


def test_a_state_beyond_memory_without_nvme_is_refused(tiny: Tiny) -> None:
    memory = str(tiny.device_bytes + tiny.host_bytes)
    result = _plan(tiny.model, "--memory", memory, "--hardware", CPU_PROFILE)
    assert result.exit_code == 1
    assert "no --nvme" in result.output and "training state needs" in result.output


def test_json_has_every_number(tiny: Tiny, tmp_path: Path) -> None:
    memory = str(int(1.25 * (tiny.device_bytes + tiny.host_bytes)))  # below the state, whatever the split: it streams
    result = _plan(tiny.model, *SHAPE, "--memory", memory, "--nvme", tmp_path / "swap", "--hardware", CPU_PROFILE,
                   "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["machine"] == CPU_PROFILE
    for key in ("device_budget", "device_minimum", "host_budget", "host_minimum", "state"):
        assert data["memory"][key] > 0
    assert data["step_s"] > 0 and data["tokens_per_s"] > 0 and data["peak_rss"] > 0
    assert data["disk"]["swap_bytes"] > 0 and data["disk"]["checkpoint_bytes"] > 0
    assert data["io_per_step"]["disk_read"] > 0 and set(data["busy_s"]) >= {"compute", "disk", "optimizer"}
    assert data["bottleneck"] in data["busy_s"] and data["problems"] == []
    assert any("is the minimum" in line for line in data["advice"])


def test_checkpoints_in_swap_are_planned_on_the_swap_path(tiny: Tiny, tmp_path: Path) -> None:
    """With --nvme the kept checkpoints are in swap and only the final one is on --output; the disk one holds at
    most is what a real one references (the engine's, saved after a step in which every chunk was rewritten)."""
    from transformers import AutoModelForCausalLM

    from finetune import offload, optim

    memory = str(int(1.25 * (tiny.device_bytes + tiny.host_bytes)))
    options = [*SHAPE, "--memory", memory, "--nvme", tmp_path / "swap", "--hardware", CPU_PROFILE,
               "--keep-checkpoints", "3", "--json"]
    data = json.loads(_plan(tiny.model, *options).output.strip().splitlines()[-1])["disk"]
    portable = json.loads(_plan(tiny.model, *options, "--portable-checkpoints").output.strip().splitlines()[-1])["disk"]
    assert (data["checkpoints_in_swap"], data["checkpoints_kept"]) == (3, 1)
    assert (portable["checkpoints_in_swap"], portable["checkpoints_kept"]) == (0, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    budget = offload.Budget(device="1GB", host="1GB", nvme=tmp_path / "real")
    with offload.Engine(model, optim.AdamW(), budget) as engine:
        engine.save_checkpoint(tmp_path / "checkpoint")  # at step 0 the moments are zeros: no file of theirs
        engine.drop_checkpoint(tmp_path / "checkpoint")
        engine.train_step({"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.randint(0, 100, (2, 8))})
        engine.save_checkpoint(tmp_path / "checkpoint")
        referenced = torch.load(tmp_path / "checkpoint" / "engine_state.pt", weights_only=True)["swap"]["chunks"]
        held = sum((engine.swap_directory / ref[0]).stat().st_size for ref in referenced.values())
    assert held == data["checkpoint_in_swap_bytes"]


def test_a_config_only_directory_is_enough(tiny: Tiny, tmp_path: Path) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny.model / "config.json", config_only / "config.json")
    result = _plan(config_only, *SHAPE, "--hardware", CPU_PROFILE, "--lora", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    full = json.loads(_plan(config_only, *SHAPE, "--hardware", CPU_PROFILE, "--json").output.splitlines()[-1])
    assert 0 < data["disk"]["checkpoint_bytes"] < full["disk"]["checkpoint_bytes"]  # LoRA: the adapters only


def test_hardware_from_a_json_file(tiny: Tiny, tmp_path: Path) -> None:
    profile = tmp_path / "box.json"
    profile.write_text(json.dumps({"flops": 1e10, "disk_read": 1e9, "disk_write": 1e9, "optimizer_rate": 1e9,
                                   "ram": 8 * 2**30}))
    result = _plan(tiny.model, *SHAPE, "--hardware", profile, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["machine"] == "box" and data["memory"]["host_budget"] == 4 * 2**30


def test_an_unknown_profile_is_a_usage_error(tiny: Tiny) -> None:
    result = _plan(tiny.model, "--hardware", "no-such-box")
    assert result.exit_code == 2
    assert CPU_PROFILE in result.output


def test_a_cuda_profile(tiny: Tiny, tmp_path: Path) -> None:
    result = _plan(tiny.model, *SHAPE, "--hardware", "fuyou-rtx4090", "--nvme", tmp_path / "swap", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["peak_device_memory"] > 0 and "host-device link" in data["busy_s"]


def test_run_dry_run_writes_nothing(tiny: Tiny, learnable: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    memory = str(2 * (tiny.device_bytes + tiny.host_bytes))
    result = runner.invoke(app, ["run", str(tiny.model), str(learnable), "--output", str(output), *SHAPE,
                                 "--memory", memory, "--nvme", str(tmp_path / "swap"), "--hardware", CPU_PROFILE,
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "step time" in result.output
    assert not output.exists() and not (tmp_path / "swap").exists()


def test_hardware_without_dry_run_is_a_usage_error(tiny: Tiny, learnable: Path) -> None:
    result = runner.invoke(app, ["run", str(tiny.model), str(learnable), "--hardware", CPU_PROFILE])
    assert result.exit_code == 2



def _mezo_plan_args(tiny: Tiny, tmp_path: Path) -> list[str | Path]:
    """A 12-layer copy of the tiny model (config.json only) and a --memory below its MeZO state even in bf16, at
    the larger of the two storage dtypes' minimums (bf16's device floor holds fp32 copies too)."""
    import torch

    from finetune import offload, optim
    from finetune.cli.model import build_meta_model

    deep = tmp_path / "deep"
    deep.mkdir()
    config = json.loads((tiny.model / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    model = build_meta_model(deep)
    memory = max(sum(offload.Engine.minimum_budget(model, optim.MeZO(storage_dtype=dtype)))
                 for dtype in (torch.float32, torch.bfloat16))
    assert memory < offload.Engine.state_bytes(model, optim.MeZO(storage_dtype=torch.bfloat16))
    (tmp_path / "disk").mkdir()
    return [deep, *SHAPE, "--optimizer", "mezo", "--memory", str(memory), "--nvme", tmp_path / "disk" / "swap",
            "--hardware", CPU_PROFILE]


def test_mezo_with_bf16_storage_plans_about_half_the_swap(tiny: Tiny, tmp_path: Path) -> None:
    args = _mezo_plan_args(tiny, tmp_path)
    fp32 = json.loads(_plan(*args, "--json").output.strip().splitlines()[-1])
    bf16 = json.loads(_plan(*args, "--storage-dtype", "bf16", "--json").output.strip().splitlines()[-1])
    assert (fp32["weights_dtype"], bf16["weights_dtype"]) == ("float32", "bfloat16")
    assert bf16["compute_dtype"] == "float32"
    assert 0 < bf16["disk"]["swap_bytes"] <= 0.55 * fp32["disk"]["swap_bytes"]
    assert bf16["memory"]["state"] <= 0.55 * fp32["memory"]["state"]
    assert 0 < bf16["io_per_step"]["disk_read"] <= 0.55 * fp32["io_per_step"]["disk_read"]
    assert bf16["disk"]["checkpoint_bytes"] == fp32["disk"]["checkpoint_bytes"]  # checkpoints are fp32
    table = _plan(*args, "--storage-dtype", "bf16")
    assert table.exit_code == 0, table.output
    assert "weights stored in bfloat16" in table.output


def test_a_mezo_run_beyond_the_disk_is_told_of_bf16_storage(tiny: Tiny, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = _mezo_plan_args(tiny, tmp_path)
    disk = json.loads(_plan(*args, "--json").output.strip().splitlines()[-1])["disk"]
    swap = disk["swap_bytes"] + disk["checkpoints_in_swap_bytes"]  # both MeZO's weights: halved in bf16
    usage = shutil.disk_usage(tmp_path)
    short = usage._replace(free=swap // 2 + swap // 8)  # room for bf16 weights, not for fp32 ones
    monkeypatch.setattr(shutil, "disk_usage", lambda path: short if Path(path).name == "disk" else usage)
    result = _plan(*args)
    assert result.exit_code == 1
    assert "pass --storage-dtype bf16" in " ".join(result.output.split())
    fits = _plan(*args, "--storage-dtype", "bf16")
    assert fits.exit_code == 0, fits.output


def test_the_planner_chooses_the_knobs_the_flags_leave_open(tiny: Tiny, tmp_path: Path) -> None:
    """Without --prefetch the plan names the planner's depth, with it the user's; on CPU the planner splits
    --memory (each tier at least its minimum), and a typed tier is left as typed."""
    memory = int(1.25 * (tiny.device_bytes + tiny.host_bytes))
    common = [tiny.model, *SHAPE, "--nvme", tmp_path / "swap", "--hardware", CPU_PROFILE, "--json"]

    def plan(*more: str | int) -> dict:
        result = _plan(*common, *map(str, more))
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])

    chosen = plan("--memory", memory)
    assert chosen["settings"]["chosen"] == ["prefetch", "split"] and 1 <= chosen["settings"]["prefetch"] <= 4
    budgets = chosen["memory"]
    assert budgets["device_budget"] + budgets["host_budget"] == memory
    assert budgets["device_budget"] >= budgets["device_minimum"] and budgets["host_budget"] >= budgets["host_minimum"]
    given = plan("--memory", memory, "--prefetch", 3)
    assert given["settings"] == {"prefetch": 3, "chosen": ["split"]}
    typed = plan("--memory", memory, "--device-memory", tiny.device_bytes)
    assert typed["settings"]["chosen"] == ["prefetch"]
    assert (typed["memory"]["device_budget"], typed["memory"]["host_budget"]) == (tiny.device_bytes,
                                                                                  memory - tiny.device_bytes)
    table = _plan(*common[:-1], "--memory", memory)
    assert "prefetch depth" in table.output and "planner's choice" in table.output


class _Built(Exception):
    """Raised by the spy engine: the run got as far as building its engine."""


def test_run_builds_its_engine_with_the_plans_knobs(tiny: Tiny, learnable: Path, env: dict[str, str],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", env["FINETUNE_CACHE_DIR"])  # this machine's rates, measured once
    from finetune import offload

    built: list[dict] = []

    class Spy(offload.Engine):
        def __init__(self, model: object, optimizer: object, budget: object, **options: object) -> None:
            built.append({"budget": budget, **options})
            raise _Built

    monkeypatch.setattr("finetune.cli.train.Engine", Spy)
    memory = str(int(1.25 * (tiny.device_bytes + tiny.host_bytes)))
    flags = [*SHAPE, "--memory", memory, "--nvme", str(tmp_path / "swap")]
    planned = json.loads(_plan(tiny.model, *flags, "--json").output.strip().splitlines()[-1])
    for more, depth in (([], planned["settings"]["prefetch"]), (["--prefetch", "4"], 4)):
        result = runner.invoke(app, ["run", str(tiny.model), str(learnable), "--output", str(tmp_path / "out"),
                                     *flags, *more])
        assert isinstance(result.exception, _Built), result.output
        assert built[-1]["prefetch"] == depth
        assert f"prefetch {depth} (" in result.output  # the one-line plan names it
    budget = built[0]["budget"]  # the options `plan` was given: its split of --memory
    assert (budget.device, budget.host) == (planned["memory"]["device_budget"], planned["memory"]["host_budget"])
