"""Stochastic rounding from float32 to bfloat16: unbiased, so an update far smaller than a bf16 step still moves
the stored weights, in expectation.

bfloat16 keeps the top 16 bits of a float32 (sign, the same 8 exponent bits, 7 mantissa bits). Round-to-nearest
maps theta - lr*u back onto theta whenever |lr*u| is below half a bf16 step (2^-9 to 2^-8 of |theta|), which is where
MeZO's updates live (lr 1e-7 to 1e-5): stored in bf16 that way, training would not move. Adding 16 uniform random
bits to the bits that are cut off and then cutting them rounds away from zero with probability (distance to the
lower neighbour) / (gap between the neighbours): E[round(x)] = x, and the result is always one of x's two bf16
neighbours (x itself when it is already a bf16 value). Spacing is uniform within a binade and the carry of a
rounding up steps into the next binade exactly, so this holds across exponent boundaries too.
"""

from __future__ import annotations

import torch

__all__ = ["stochastic_round_to_bf16"]

_KEPT_BITS = -(1 << 16)  # 0xFFFF0000 as an int32: sign, exponent and the 7 mantissa bits bfloat16 keeps


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x` (float32) rounded to bfloat16, up or down at random in proportion to its distance to each neighbour.

    Args:
        x: float32 values, on the generator's device.
        generator: the source of the 16 random bits per element; seeded by the caller (MeZO seeds it from
            (seed, step, tensor name), so a rerun and a resumed run round alike).

    Returns:
        A new bfloat16 tensor shaped like `x`. Infinities stay infinite and NaN stays NaN; a finite value within a
        step of bf16's largest rounds to infinity with the probability of its distance past that largest value.

    Raises:
        TypeError: `x` is not float32.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 rounds float32 values, got {x.dtype}")
    x = x.contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    rounded = ((x.view(torch.int32) + noise) & _KEPT_BITS).view(torch.float32)
    rounded = torch.where(torch.isnan(x), x, rounded)  # a NaN's low payload bits could carry it into infinity
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero
