"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The rate is a pure function of the step number and a decay horizon (`--decay-steps`: the step at which the decay
reaches `--min-lr`). A resumed run therefore needs nothing restored but the step it stopped at, and a checkpoint
cannot hold a schedule that disagrees with its step.

The rule for a run that grows: the horizon is fixed when a run starts (by default its --steps, or the steps its
--epochs make) and saved resolved in run-config.yaml, so `--resume --steps N` with a larger N keeps it. The
extended run equals, bit for bit, a new run started with `--steps N --decay-steps ORIGINAL`; for a constant
schedule, any new run of N steps. Past the horizon a cosine or linear rate stays at --min-lr (the CLI says so
once). `--decay-steps` given on resume moves the horizon from the next step on; the steps already taken keep the
rates they ran with.
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
    then goes from `lr` at the first step after warmup to `min_lr` at the horizon, `decay_steps` (default:
    `total_steps`), and stays there after it.
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: Schedule = Schedule.COSINE
    min_lr: float = 0.0
    decay_steps: int | None = None

    @property
    def horizon(self) -> int:
        """The step at which a cosine or linear decay reaches `min_lr`."""
        return self.total_steps if self.decay_steps is None else self.decay_steps

    def __call__(self, step: int) -> float:
        """The rate for `step` (1 for the first optimizer step, as the engine counts)."""
        if step <= self.warmup_steps:
            return self.lr * step / (self.warmup_steps + 1)
        if self.schedule is Schedule.CONSTANT:
            return self.lr
        decay_steps = self.horizon - self.warmup_steps - 1
        progress = min(1.0, (step - self.warmup_steps - 1) / decay_steps) if decay_steps > 0 else 0.0
        if self.schedule is Schedule.LINEAR:
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor
