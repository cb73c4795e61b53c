"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The rate is a pure function of the step number. A resumed run therefore needs nothing restored but the step it
stopped at, and a checkpoint cannot hold a schedule that disagrees with its step.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Schedule", "LearningRate"]


class Schedule(str, enum.Enum):
    """Shape of the decay after warmup."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


@dataclass(frozen=True)
class LearningRate:
    """The learning rate of every step of one run.

    Warmup rises linearly from lr / (warmup_steps + 1) to `lr` over the first `warmup_steps` steps. The decay
    then goes from `lr` at the first step after warmup to `min_lr` at `total_steps`.
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: Schedule = Schedule.COSINE
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """The rate for `step` (1 for the first optimizer step, as the engine counts)."""
        if step <= self.warmup_steps:
            return self.lr * step / (self.warmup_steps + 1)
        if self.schedule is Schedule.CONSTANT:
            return self.lr
        decay_steps = self.total_steps - self.warmup_steps - 1
        progress = min(1.0, (step - self.warmup_steps - 1) / decay_steps) if decay_steps > 0 else 0.0
        if self.schedule is Schedule.LINEAR:
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor
