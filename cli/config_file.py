"""`--config FILE`: a run's options read from a YAML or TOML file, by their field names (cli/config.py).

The values are returned as read; `RunConfig` brings them to each field's type and checks them, so a file and the
flags are checked by the same code. A file written for Hugging Face's Trainer may use its names (`learning_rate`,
`per_device_train_batch_size`, ...: `HF_NAMES`); `warmup_steps`, `weight_decay`, `max_grad_norm`, `seed` and
`report_to` are the same in both.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

__all__ = ["HF_NAMES", "HF_SCHEDULES", "load_config_file"]

HF_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "accumulation_steps",
    "num_train_epochs": "epochs",
    "max_steps": "steps",
    "lr_scheduler_type": "schedule",
    "output_dir": "output",
    "eval_steps": "eval_every",
    "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints",
    "logging_steps": "log_every",
}
"""transformers.TrainingArguments' names of options this tool has under another name, and that name."""

HF_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
"""`lr_scheduler_type` values and the --schedule each is (constant warms up first here, for --warmup-steps)."""


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a YAML (.yaml/.yml) or TOML (.toml) file, keys as field names (`seq-len` is accepted
    for `seq_len`) or as Hugging Face's (`HF_NAMES`).

    Raises:
        ConfigError: unreadable or malformed file, unknown keys (with the closest valid name, ours or Hugging
            Face's), an option given under both names, or an lr_scheduler_type with no counterpart here.
    """
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .yaml, .yml or .toml file")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot read it ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    names = [field.name for field in dataclasses.fields(RunConfig)]
    unknown = [key for key in values if key not in names and key not in HF_NAMES]
    if unknown:
        hints = [f"{key!r}" + "".join(f" (did you mean {m!r}?)"
                                      for m in difflib.get_close_matches(key, [*names, *HF_NAMES], 1))
                 for key in unknown]
        raise ConfigError(f"--config {path}: unknown option {', '.join(hints)}")
    return _from_hf_names(values, path)


def _from_hf_names(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """`values` with Hugging Face's names (and their conventions: max_steps -1 is unset) as ours.

    Raises:
        ConfigError: an option given under both names, or an lr_scheduler_type with no counterpart.
    """
    both = [f"{hf!r} and {ours!r}" for hf, ours in HF_NAMES.items() if hf in values and ours in values]
    if both:
        raise ConfigError(f"--config {path}: {'; '.join(both)} are the same option; keep one")
    schedule = values.get("lr_scheduler_type")
    if schedule is not None and (not isinstance(schedule, str) or schedule not in HF_SCHEDULES):
        raise ConfigError(f"--config {path}: lr_scheduler_type {schedule!r} has no counterpart here; use "
                          f"{', '.join(HF_SCHEDULES)} (or schedule: cosine, linear or constant)")
    if values.get("max_steps") == -1:  # Trainer's "not set": train for num_train_epochs
        del values["max_steps"]
    return {HF_NAMES.get(key, key): HF_SCHEDULES[value] if key == "lr_scheduler_type" else value
            for key, value in values.items()}
