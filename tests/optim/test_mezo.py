"""MeZO with its weights stored in bfloat16: the update is fp32 math, written back by stochastic rounding.

Reference: the fp32 update theta - lr * g * z (optim.mezo_update). Stored in bf16, MeZO's steps are far below half
a bf16 step: round-to-nearest loses them entirely, stochastic rounding keeps them in expectation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from finetune import optim

ELEMENTS = 1_000_000
LR = 2e-4  # |lr * z| stays below 2^-9, half the smallest bf16 step of weights in [1, 2]
TOLERANCE = 0.1  # relative; the rounding noise of the projection below is about 1.6% (6 sigma)


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def test_round_to_nearest_loses_the_update_that_stochastic_rounding_keeps():
    theta = (1 + torch.rand(ELEMENTS)).to(torch.bfloat16)  # bf16 weights in [1, 2]: steps of 2^-8 to 2^-6
    mezo = optim.MeZO(lr=LR, seed=_seed(), storage_dtype=torch.bfloat16)
    g = 1.0
    z = mezo.direction(1, 0, "w", theta.float())
    exact = optim.mezo_update(theta.float(), [z], [g], lr=LR, weight_decay=0.0)
    assert torch.equal(exact.to(torch.bfloat16), theta)  # round to nearest: not one weight moves
    stored = theta.clone()
    mezo.update(stored, "w", 1, [g])
    moved = stored.double() - theta.double()
    assert bool((moved != 0).any())
    # E[moved] = exact - theta = -lr * g * z, so the projection of `moved` on z is -lr * g * |z|^2.
    projection = (moved * z.double()).sum() / (z.double() ** 2).sum()
    assert_close(projection.item(), -LR * g, rtol=TOLERANCE, atol=0.0)


def test_the_rounding_noise_is_keyed_by_seed_step_and_name():
    """So a resumed run and the reference round alike (the same scheme as MeZO.direction's z)."""
    theta = torch.randn(4096).to(torch.bfloat16)
    mezo = optim.MeZO(lr=1e-3, seed=_seed(), storage_dtype=torch.bfloat16)

    def updated(step: int, name: str, seed: int = mezo.seed) -> torch.Tensor:
        stored = theta.clone()
        dataclasses.replace(mezo, seed=seed).update(stored, name, step, [0.5])
        return stored

    assert torch.equal(updated(3, "w"), updated(3, "w"))
    assert not torch.equal(updated(3, "w"), updated(4, "w"))
    assert not torch.equal(updated(3, "w"), updated(3, "v"))
    assert not torch.equal(updated(3, "w"), updated(3, "w", seed=mezo.seed + 1))


def test_fp32_storage_is_the_plain_update():
    theta = torch.randn(300, 7)
    mezo = optim.MeZO(lr=1e-3, seed=_seed(), weight_decay=0.1)
    z = mezo.direction(2, 0, "w", theta)
    expected = optim.mezo_update(theta, [z], [0.25], lr=1e-3, weight_decay=0.1)
    mezo.update(theta, "w", 2, [0.25])
    assert torch.equal(theta, expected)


def test_storage_dtype_is_checked():
    with pytest.raises(ValueError, match="storage_dtype=torch.float16 must be one of"):
        optim.MeZO(storage_dtype=torch.float16)
    with pytest.raises(TypeError, match="was given w in torch.float32"):
        optim.MeZO(storage_dtype=torch.bfloat16).update(torch.zeros(4), "w", 1, [1.0])


def test_in_memory_mezo_with_bf16_storage_keeps_bf16_values_in_fp32_parameters(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = optim.InMemoryMeZO(model.named_parameters(),
                                   optim.MeZO(lr=1e-3, seed=_seed(), storage_dtype=torch.bfloat16))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = random_batch(128, batch=2, seq=8, generator=generator)
        optimizer.step(lambda batch=batch: model(**batch, use_cache=False).loss)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # compute stays fp32
        assert torch.equal(p.detach(), p.detach().to(torch.bfloat16).float()), name  # the values are bf16's
    assert any(not torch.equal(p.detach(), before[name].to(torch.bfloat16).float())  # and they moved
               for name, p in model.named_parameters())
