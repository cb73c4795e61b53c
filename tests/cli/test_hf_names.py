"""--config files written for Hugging Face's Trainer: its names for our options (cli/config_file.py's HF_NAMES),
its scheduler names, a name given both ways refused, and an unknown name answered with the closest of either."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from finetune.cli.config import ConfigError, RunConfig
from finetune.cli.config_file import HF_NAMES, load_config_file
from finetune.cli.schedule import Schedule


def _load(tmp_path: Path, text: str, suffix: str = ".yaml") -> RunConfig:
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    return RunConfig(**{"model": "m", "dataset": "d", **load_config_file(path)})


def test_every_hf_name_is_an_option_here() -> None:
    assert set(HF_NAMES.values()) <= {field.name for field in dataclasses.fields(RunConfig)}


def test_a_trainer_config_reads_as_ours(tmp_path: Path) -> None:
    config = _load(tmp_path, "learning_rate: 1.0e-4\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 8\n"
                             "max_steps: 500\nwarmup_steps: 50\nlr_scheduler_type: constant_with_warmup\n"
                             "max_grad_norm: 0.5\nweight_decay: 0.1\nseed: 7\noutput_dir: out\neval_steps: 25\n"
                             "save_steps: 100\nsave_total_limit: 3\n")
    assert (config.lr, config.batch_size, config.accumulation_steps, config.steps) == (1e-4, 4, 8, 500)
    assert (config.warmup_steps, config.schedule, config.max_grad_norm, config.weight_decay) == (
        50, Schedule.CONSTANT, 0.5, 0.1)
    assert (config.seed, config.output, config.eval_every, config.checkpoint_every, config.keep_checkpoints) == (
        7, "out", 25, 100, 3)


def test_trainer_conventions(tmp_path: Path) -> None:
    """max_steps -1 is the Trainer's "not set" (train num_train_epochs); TOML and dashed names work too."""
    config = _load(tmp_path, "max-steps = -1\nnum-train-epochs = 2.5\nlr_scheduler_type = \"linear\"\n", ".toml")
    assert (config.steps, config.epochs, config.schedule) == (None, 2.5, Schedule.LINEAR)


@pytest.mark.parametrize(("text", "message"), [
    ("lr: 0.1\nlearning_rate: 0.2\n", "'learning_rate' and 'lr' are the same option; keep one"),
    ("lr_scheduler_type: polynomial\n", "lr_scheduler_type 'polynomial' has no counterpart here; use cosine, linear, "
                                        "constant, constant_with_warmup"),
    ("learning_rat: 0.1\n", "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
    ("seq_lenght: 64\n", "unknown option 'seq_lenght' (did you mean 'seq_len'?)"),
    ("learning_rate: fast\n", "--lr 'fast': expected float"),  # checked as the option it is
])
def test_bad_names_and_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    assert message in str(error.value)
