"""Shared fixtures: tiny models saved to disk and loaded back by path, so the real loading code runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py is a helper module, not a package
