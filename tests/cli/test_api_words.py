"""Errors in the command line's words: the engine's messages name its Python API (`Budget.nvme`, `max_grad_norm=`),
and the CLI passes them on with the flags instead (cli/api_words.py). Reference: the engine's own messages, made
by its checks here where they can be (so a reworded check cannot slip past), quoted where they come from deep in
a step; and one run refused by the engine, in process."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from cli_support import Tiny
from typer.testing import CliRunner

from finetune import offload, optim
from finetune.cli import plan as cli_plan
from finetune.cli.api_words import in_cli_words
from finetune.cli.main import app
from finetune.cli.model import build_meta_model
from finetune.offload.floors import Floors, check_budget

runner = CliRunner()
API_WORDS = ("Budget", "max_grad_norm", "prefetch=", "accumulation_steps", "quantize_frozen", "compute_dtype",
             "Engine", "None")


def _engine_error(**settings: object) -> str:
    with pytest.raises(ValueError) as error:
        check_budget(Floors(device=100, host=200, largest_layer="model.layers.0", state=10_000), **settings)
    return str(error.value)


@pytest.mark.parametrize(("settings", "expected"), [
    (dict(device_bytes=10, host_bytes=20, nvme=None),
     ["--device-memory 10 B is below the minimum", "--host-memory 20 B is below the minimum",
      "but --device-memory + --host-memory is 30 B and no --nvme was given; pass --nvme with a directory on a fast "
      "disk, or raise --memory"]),
])
def test_budget_checks(settings: dict, expected: list[str]) -> None:
    message = in_cli_words(_engine_error(**settings))
    for text in expected:
        assert text in message, message
    assert not any(word in message for word in API_WORDS), message


def test_engine_settings_checks(tiny: Tiny) -> None:
    model = build_meta_model(tiny.model)
    with pytest.raises(ValueError) as error:
        offload.Engine(model, optim.AdamW(), prefetch=-1, accumulation_steps=0, max_grad_norm=-1.0)
    message = in_cli_words(str(error.value))
    assert message == ("--prefetch -1 must be >= 0; --accumulation-steps 0 must be >= 1; --max-grad-norm -1.0 must "
                       "be > 0, or 0 for no clipping"), message


def test_a_store_without_room_and_a_swap_area_in_use() -> None:
    assert in_cli_words("the host tier is full and blocks.3 has no NVMe file to go to; set Budget.nvme or raise the "
                        "budgets") == ("the host tier is full and blocks.3 has no NVMe file to go to; pass --nvme with "
                                       "a directory on a fast disk, or raise --memory")
    assert in_cli_words("held; wait for that engine to close, or use another Budget.nvme") == \
        "held; wait for that engine to close, or use another --nvme"
    assert in_cli_words("raise the device budget or lower the prefetch depth (held: a)") == \
        "raise --device-memory or lower --prefetch (held: a)"


def test_run_reports_a_full_swap_disk_in_flags(tiny: Tiny, learnable: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap disk with 4 KB free: the planner's probe file does not fit there (so `run` goes on without a plan),
    and the engine refuses the disk, in its words; the user reads them in flags."""
    def no_room_to_measure(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli_plan, "make_plan", no_room_to_measure)
    monkeypatch.setattr(offload.Hardware, "disk_free", lambda self, path: 4096)
    result = runner.invoke(app, ["run", str(tiny.model), str(learnable), "--output", str(tmp_path / "out"),
                                 "--steps", "1", "--seq-len", "16", "--prefetch", "1",
                                 *tiny.budget_flags(tmp_path / "swap")], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"--nvme {tmp_path / 'swap'} has 4.00 KB free but the swap files can grow to" in message, message
    assert "Budget" not in message
    assert not (tmp_path / "out" / "checkpoints").exists()
