"""Where a step's time goes, told to whoever asks: the engine reports named phases to a `Timers` object.

Benchmarks pass one in (`Engine(timers=...)`) instead of replacing the engine's methods to time them. Phases:

- "forward", "backward": the first-order step's passes over a micro-batch (compute thread; they include load waits).
- "load wait": the compute thread waiting for a chunk to arrive in device memory (I/O prefetch did not hide).
- "wait for updates": the end of a step waiting for the optimizer worker.
- "update": the worker's whole update of one block (overlaps backward, but for exact clipping's redone updates and
  exact clipping without a swap directory, which run after it).
- "optimizer math": the optimizer's arithmetic inside "update" (MeZO: its update when a block is loaded).
- "frozen read": reading and converting a frozen chunk from the model's safetensors (the frozen-read thread).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NO_TIMERS", "Timers"]


class Timers(Protocol):
    """Receives seconds per phase. Called from several threads at once: `add` must be thread-safe."""

    def add(self, name: str, seconds: float) -> None: ...


class _NoTimers:
    def add(self, name: str, seconds: float) -> None:
        """Nothing is recorded."""


NO_TIMERS: Timers = _NoTimers()
