"""Streamed safetensors shards: the writer is `safetensors_io.write_safetensors_shards` now.

engine.py imports it from here; drop this module once engine.py imports it from safetensors_io.
"""

from .safetensors_io import write_safetensors_shards  # noqa: F401
