"""`--optimizer-args` (cli/optimizer_args.py): NAME=VALUE pairs read as literals, checked against the optimizer's own
constructor (its signature for the names, its own errors for the values), reaching every setting of every
optimizer, saved in run-config.yaml, refused when a resume changes them, and counted by the planner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_support import Tiny, run_finetune
from typer.testing import CliRunner

from finetune.cli.config import RESUMABLE_CHANGES, ConfigError, OptimizerName, RunConfig
from finetune.cli.engine_options import make_optimizer
from finetune.cli.main import app
from finetune.cli.optimizer_args import (
    format_optimizer_args,
    optimizer_kwargs,
    optimizer_settings,
    parse_optimizer_args,
)

runner = CliRunner()

VALUES = {
    "betas": ("(0.8,0.9)", (0.8, 0.9)),
    "eps": ("1e-05", 1e-5),
    "min_8bit_size": ("1024", 1024),
    "fp32_embeddings": ("false", False),
    "rank": ("8", 8),
    "update_proj_gap": ("50", 50),
    "scale": ("0.5", 0.5),
    "full_rank": ("(lm_head,)", ("lm_head",)),
    "density": ("0.5", 0.5),
    "subspace": ("svd", "svd"),
    "update_gap": ("10", 10),
    "reset_statistics": ("false", False),
    "inactive_update": ("sgd", "sgd"),
    "inactive_lr_scale": ("0.5", 0.5),
    "seed": ("3", 3),
    "samples": ("2", 2),
}
"""A value other than the default for each setting, as typed and as the optimizer then holds it. A setting added
to an optimizer's constructor fails test_every_setting_of_every_optimizer_is_reachable until it is listed here."""


def _config(optimizer: str, args: str | dict | None, **fields: object) -> RunConfig:
    return RunConfig(model="m", dataset="d", optimizer=optimizer, optimizer_args=args, **fields)


@pytest.mark.parametrize(("optimizer", "setting"), [
    (optimizer.value, setting) for optimizer in OptimizerName for setting in optimizer_settings(optimizer.value)])
def test_every_setting_of_every_optimizer_is_reachable(optimizer: str, setting: str) -> None:
    typed, held = VALUES[setting]
    built = make_optimizer(_config(optimizer, f"{setting}={typed}"))
    assert getattr(built, setting) == held
    assert built.lr == RunConfig.lr  # the flags' settings still come from the flags


def test_values_are_read_as_literals() -> None:
    assert parse_optimizer_args(" rank = 64, scale=0.25,betas=(0.9, 0.95),fp32_embeddings=True,subspace=svd,"
                                "name='64',full_rank=[lm_head,embed_out]") == {
        "rank": 64, "scale": 0.25, "betas": (0.9, 0.95), "fp32_embeddings": True, "subspace": "svd", "name": "64",
        "full_rank": ("lm_head", "embed_out")}
    assert parse_optimizer_args(None) == parse_optimizer_args(" , ") == {}


def test_the_saved_text_reads_back_to_the_same_values() -> None:
    values = {"update_proj_gap": 200, "rank": 64, "betas": [0.9, 0.95], "name": "64", "flag": False,
              "heads": ("lm_head",)}
    text = format_optimizer_args(values)
    assert text == "betas=(0.9,0.95),flag=false,heads=(lm_head,),name='64',rank=64,update_proj_gap=200"
    assert parse_optimizer_args(text) == {**values, "betas": (0.9, 0.95)}
    assert format_optimizer_args({}) is None


@pytest.mark.parametrize(("optimizer", "text", "message"), [
    ("galore", "rnk=64", "--optimizer-args rnk=64: galore has no setting 'rnk' (did you mean 'rank'?); its settings: "
                         "betas, eps, rank, update_proj_gap, scale, full_rank"),
    ("adamw", "rank=64", "adamw has no setting 'rank' (it is a setting of galore: pass --optimizer galore)"),
    ("galore", "lr=0.001", "--optimizer-args lr=0.001: lr has a flag of its own; pass --lr 0.001 instead"),
    ("frugal", "weight_decay=0.1", "pass --weight-decay 0.1 instead"),
    ("mezo", "storage_dtype=bf16", "pass --storage-dtype bf16 instead"),
    ("mezo", "seed=3", "pass --seed 3 instead"),
    ("galore", "rank=abc", "--optimizer-args rank=abc: galore's rank takes an int, not abc"),
    ("galore", "rank=8.5", "galore's rank takes an int, not 8.5"),
    ("galore", "betas=(0.9,)", "galore's betas takes (float,float), not (0.9,)"),
    ("galore", "rank=0", "--optimizer-args rank=0: GaLore: rank=0 must be >= 1"),  # the constructor's own words
    ("frugal", "subspace=rows", "Frugal: subspace='rows' must be one of ('columns', 'svd')"),
    ("mezo", "samples=0", "MeZO: samples=0 must be >= 1"),
    ("adamw8bit", "min_8bit_size=-1", "AdamW8bit: min_8bit_size=-1 must be >= 0"),
    ("adamw", "betas", "--optimizer-args 'betas' is not NAME=VALUE"),
    ("adamw", "eps=1,eps=2", "--optimizer-args: eps is given twice"),
])
def test_bad_settings_are_refused_in_one_line(optimizer: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        optimizer_kwargs(optimizer, text)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="--optimizer-args"):  # the same, as a usage error of the options
        _config(optimizer, text)


def test_a_config_file_mapping_is_saved_as_text_and_a_resume_may_not_change_it() -> None:
    config = _config("galore", {"update_proj_gap": 50, "rank": 8, "full_rank": ["lm_head"]})
    assert config.optimizer_args == "full_rank=(lm_head,),rank=8,update_proj_gap=50"
    assert RunConfig(**yaml.safe_load(config.to_yaml())) == config
    assert _config("galore", "rank = 8 ,update_proj_gap=50,full_rank=lm_head").optimizer_args == \
        "full_rank=lm_head,rank=8,update_proj_gap=50"
    assert _config("galore", "").optimizer_args is None
    # A resume compares the saved text: a change is refused (cli/train.py's configure), a respelling is not one.
    assert "optimizer_args" not in RESUMABLE_CHANGES
    saved = _config("galore", "rank=8,scale=0.5")
    assert saved.differences(_config("galore", "scale=0.5, rank=8")) == []
    assert saved.differences(_config("galore", "rank=16,scale=0.5")) == [
        "--optimizer-args 'rank=8,scale=0.5' (checkpoint: 'rank=16,scale=0.5')"]


def test_the_script_prints_a_bad_name_as_one_error_line(env: dict[str, str], tmp_path: Path) -> None:
    """Before anything is read or written: the output directory is not made."""
    result = run_finetune(env, "run", tmp_path / "model", tmp_path / "data.jsonl", "--output", tmp_path / "out",
                          "--optimizer", "galore", "--optimizer-args", "rank=64,update_proj_gp=100")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: Invalid value: --optimizer-args update_proj_gp=100: galore has no setting 'update_proj_gp' (did you "
        "mean 'update_proj_gap'?); its settings: betas, eps, rank, update_proj_gap, scale, full_rank (see 'finetune "
        "run --help')"]
    assert not (tmp_path / "out").exists()


def test_the_plan_counts_the_state_of_the_settings_given(tiny: Tiny, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """GaLore's state is its projection and its moments in rank dimensions: a lower rank plans less state. The
    tiny model's layers are 32 wide, so ranks 4 and 16 both project."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny.model / "config.json", config_only / "config.json")

    def state(rank: int) -> int:
        result = runner.invoke(app, ["plan", str(config_only), "--optimizer", "galore", "--optimizer-args",
                                     f"rank={rank}", "--hardware", "laptop-24gb-cpu", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])["memory"]["state"]

    assert state(4) < state(16)
