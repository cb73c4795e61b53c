"""Byte sizes as people type and read them ("8GB", "1.50 GB"), in binary units: that is how RAM and GPU memory are
sold and reported by `free` and `nvidia-smi`. Kept apart from budget.py, which needs torch, so that the command
line can check a typed size without importing it.
"""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as "512MB", "8GB", "1.5GiB" or "4096".

    Raises:
        ValueError: the string is not a size; the message shows the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}; use bytes or a string like '512MB' or '8GB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value!r}")
        return int(value)
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r}; use bytes or a string like '512MB' or '8GB'")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_bytes(nbytes: int | float) -> str:
    """Human-readable binary size, the inverse of `parse_size` up to rounding (e.g. '1.50 GB')."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TB"
