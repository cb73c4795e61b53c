"""Crash-safe file writes for the CLI: `offload.write_atomic` (offload/durable.py), where every atomic, fsynced
write of the project lives.

cli/progress.py and cli/train.py import it from here; drop this module once they import it from `..offload`.
"""

from __future__ import annotations

from ..offload import write_atomic

__all__ = ["write_atomic"]
