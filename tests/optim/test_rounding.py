"""Stochastic rounding to bfloat16 against its definition: each value goes to one of its two bf16 neighbours,
the upper one with probability (x - lower) / (upper - lower), so the mean of many roundings is x.

Reference for the neighbours: torch's own bf16 cast (round to nearest) and `torch.nextafter`, not the bit trick
under test.
"""

from __future__ import annotations

import pytest
import torch

from finetune.optim import stochastic_round_to_bf16

REPEATS = 20_000  # roundings of each value
TOLERANCE = 0.025  # of the gap between the neighbours: >= 7 standard deviations of a mean of REPEATS roundings


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper): the bf16 values around each float32 in `x`, as float32."""
    nearest = x.to(torch.bfloat16)
    above = nearest.float() > x
    infinity = torch.full_like(nearest, float("inf"))
    lower = torch.where(above, torch.nextafter(nearest, -infinity), nearest)
    return lower.float(), torch.nextafter(lower, infinity).float()


def _fresh_values(count: int) -> torch.Tensor:
    """Random float32 values of both signs over 60 decades, almost all strictly between two bf16 values."""
    return torch.randn(count) * 10.0 ** torch.randint(-30, 30, (count,)).float()


def test_the_mean_of_many_roundings_is_the_value():
    x = _fresh_values(64)
    generator = torch.Generator().manual_seed(_seed())
    rounded = stochastic_round_to_bf16(x.repeat(REPEATS, 1), generator).float()  # (REPEATS, 64)
    lower, upper = _neighbours(x)
    error = (rounded.double().mean(0) - x.double()).abs() / (upper - lower).double()
    assert error.max() < TOLERANCE, error.max()


def test_a_rounding_is_always_one_of_the_two_neighbours():
    x = _fresh_values(4096)
    lower, upper = _neighbours(x)
    rounded = stochastic_round_to_bf16(x.repeat(8, 1), torch.Generator().manual_seed(_seed())).float()
    assert bool(((rounded == lower) | (rounded == upper)).all())
    assert bool((rounded == lower).any()) and bool((rounded == upper).any())  # both happen: it is random


def test_values_bf16_holds_exactly_are_unchanged():
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), torch.finfo(torch.bfloat16).max,
                            torch.finfo(torch.bfloat16).tiny, torch.finfo(torch.bfloat16).smallest_normal / 8])
    x = torch.cat([_fresh_values(4096).to(torch.bfloat16).float(), special.to(torch.bfloat16).float()])
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(_seed()))
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded.float(), x)
    assert torch.equal(torch.signbit(rounded), torch.signbit(x))  # -0.0 stays negative


def test_nan_stays_nan_even_with_payload_bits_in_the_low_half():
    nan_low_payload = torch.tensor([0x7F800001, -0x007FFFFF], dtype=torch.int32).view(torch.float32)
    x = torch.cat([nan_low_payload, torch.tensor([float("nan")])]).repeat(1000)
    assert bool(torch.isnan(stochastic_round_to_bf16(x, torch.Generator().manual_seed(_seed()))).all())


def test_the_same_seed_rounds_alike():
    x = _fresh_values(1000)
    seed = _seed()
    first = stochastic_round_to_bf16(x, torch.Generator().manual_seed(seed))
    assert torch.equal(first, stochastic_round_to_bf16(x, torch.Generator().manual_seed(seed)))
    assert not torch.equal(first, stochastic_round_to_bf16(x, torch.Generator().manual_seed(seed + 1)))


def test_refuses_what_is_not_float32():
    with pytest.raises(TypeError, match="rounds float32 values, got torch.float64"):
        stochastic_round_to_bf16(torch.zeros(3, dtype=torch.float64), torch.Generator())
