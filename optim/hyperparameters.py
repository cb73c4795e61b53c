"""Checks of the hyperparameters every Adam-style optimizer here shares, so each reports all bad values at once."""

from __future__ import annotations

__all__ = ["adam_errors"]


def adam_errors(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> list[str]:
    """One message per bad value, naming the argument as typed and the range it must be in."""
    errors = []
    if lr < 0:
        errors.append(f"lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        errors.append(f"betas={betas} must be two numbers in [0, 1)")
    if eps < 0:
        errors.append(f"eps={eps} must be >= 0")
    if weight_decay < 0:
        errors.append(f"weight_decay={weight_decay} must be >= 0")
    return errors
