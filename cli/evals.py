"""The eval losses of a run: which eval was the best (`--keep-best`) and how many evals have not improved on it
since (`--early-stop-patience`).

The history travels in every checkpoint's `extra`, so a resumed run keeps the same best and the same count as
the run never stopped, and an early-stopped run resumed with the same patience stays stopped. The eval before
the first step (step 0) is only the starting point: it is never the best, because there is no checkpoint of it
to keep or to write OUTPUT/final/ from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalHistory"]


@dataclass
class EvalHistory:
    """The (step, eval loss) of each eval after a training step, oldest first."""

    evals: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def from_extra(cls, saved: list[list[Any]] | None) -> EvalHistory:
        """The history kept in a checkpoint's `extra` (none in a checkpoint older than this history)."""
        return cls([(int(step), float(loss)) for step, loss in saved or []])

    def to_extra(self) -> list[list[Any]]:
        """Plain lists, as a checkpoint's `extra` holds them."""
        return [[step, loss] for step, loss in self.evals]

    def add(self, step: int, loss: float) -> bool:
        """Record the eval at `step` (>= 1); returns whether it is the new best (strictly lower than every
        earlier one)."""
        improved = self.best is None or loss < self.best[1]
        self.evals.append((step, loss))
        return improved

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest eval loss, the earliest of equal ones; None before the first eval."""
        return min(self.evals, key=lambda item: item[1]) if self.evals else None

    def stalled(self, patience: int | None) -> bool:
        """Whether the last `patience` evals all failed to improve on the best (False without a patience)."""
        if not patience or self.best is None:
            return False
        since = len(self.evals) - 1 - self.evals.index(self.best)
        return since >= patience
