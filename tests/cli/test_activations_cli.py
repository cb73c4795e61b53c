"""`finetune run --activations`: parsed into RunConfig.activations, refused without --nvme for "offload", and
passed to the engine by a real run (tests/offload/test_activations.py checks the offload itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_support import Tiny, run_finetune, summary
from test_options import probe  # noqa: F401  (the fixture: configs `run` got as far as preparing)
from typer.testing import CliRunner

from finetune.cli.config import RunConfig
from finetune.cli.main import app
from finetune.offload import ActivationMode

runner = CliRunner()


def test_activations_flag_reaches_the_config(probe: list[RunConfig], tmp_path: Path) -> None:  # noqa: F811
    result = runner.invoke(app, ["run", "./m", "d.jsonl", "--nvme", str(tmp_path), "--activations", "offload"])
    assert result.exit_code == 1 and "Error: probe" in result.output
    assert probe[0].activations is ActivationMode.OFFLOAD


def test_offload_without_nvme_is_a_usage_error() -> None:
    result = runner.invoke(app, ["run", "./m", "d.jsonl", "--activations", "offload"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--activations offload writes the layers' activations to the swap directory: add --nvme" in \
        " ".join(result.output.split())


@pytest.mark.integration
def test_a_run_with_offloaded_activations_completes(tiny: Tiny, env: dict[str, str], learnable: Path,
                                                    tmp_path: Path) -> None:
    args = ["run", tiny.model, learnable, "--output", tmp_path / "run", "--steps", "2", "--batch-size", "2",
            "--seq-len", "64", "--checkpoint-every", "0", "--activations", "offload", "--json",
            *tiny.budget_flags(tmp_path / "swap")]
    result = summary(run_finetune(env, *args))
    assert result["status"] == "completed" and result["step"] == 2
    assert torch.isfinite(torch.tensor(result["train_loss"]))
