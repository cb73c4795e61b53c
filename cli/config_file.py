"""`--config FILE`: a run's options read from a YAML or TOML file, by their field names (cli/config.py).

The values are returned as read; `RunConfig` brings them to each field's type and checks them, so a file and the
flags are checked by the same code.
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

__all__ = ["load_config_file"]


def load_config_file(path: Path) -> dict[str, Any]:
    """The settings of a YAML (.yaml/.yml) or TOML (.toml) file, keys as field names (`seq-len` is accepted
    for `seq_len`).

    Raises:
        ConfigError: unreadable or malformed file, or unknown keys (with the closest valid name).
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
    unknown = [key for key in values if key not in names]
    if unknown:
        hints = [f"{key!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(key, names, 1))
                 for key in unknown]
        raise ConfigError(f"--config {path}: unknown option {', '.join(hints)}")
    return values
