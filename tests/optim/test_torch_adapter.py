"""optim.InMemory: a chunk-wise optimizer as a torch.optim.Optimizer.

Reference: torch.optim.AdamW for the adapter itself; an uninterrupted run for save -> load -> continue.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from streamed import batches
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import optim

OPTIMIZERS = {
    "adamw": lambda: optim.AdamW(lr=1e-2),
    "adamw8bit": lambda: optim.AdamW8bit(lr=1e-2),
    "galore": lambda: optim.GaLore(lr=1e-2, rank=4, update_proj_gap=2),
    "frugal-columns": lambda: optim.Frugal(lr=1e-2, density=0.3, update_gap=2),
    "frugal-svd": lambda: optim.Frugal(lr=1e-2, density=0.3, subspace="svd", update_gap=2),
}


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict]) -> None:
    for batch in data:
        optimizer.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()


def test_adamw_through_the_adapter_equals_torch_adamw(tmp_path):
    path = save_tiny_model("gpt2", tmp_path / "model", seed=1)
    data = batches(4, seed=31)
    ours, theirs = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    _train(ours, optim.InMemory.for_model(ours, optim.AdamW(lr=1e-2, weight_decay=0.1)), data)
    _train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1), data)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_save_load_continue_equals_uninterrupted(name, tmp_path):
    """3 steps, state_dict through torch.save/torch.load, 3 more steps on a fresh model and optimizer."""
    path = save_tiny_model("llama", tmp_path / "model", seed=2, hidden_size=64, intermediate_size=128)
    data = batches(6, seed=33)
    uninterrupted = AutoModelForCausalLM.from_pretrained(path)
    _train(uninterrupted, optim.InMemory.for_model(uninterrupted, OPTIMIZERS[name]()), data)

    first = AutoModelForCausalLM.from_pretrained(path)
    optimizer = optim.InMemory.for_model(first, OPTIMIZERS[name]())
    _train(first, optimizer, data[:3])
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)

    resumed = AutoModelForCausalLM.from_pretrained(path)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = optim.InMemory.for_model(resumed, OPTIMIZERS[name]())
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train(resumed, optimizer, data[3:])
    for (key, p), q in zip(resumed.named_parameters(), uninterrupted.parameters()):
        assert torch.equal(p, q), key


class _CountingAdamW(optim.AdamW):
    """An optimizer with state outside its chunks: how many tensors it updated."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.updates = 0

    def step(self, *args: Any, **kwargs: Any) -> None:
        super().step(*args, **kwargs)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]


def test_state_outside_chunks_round_trips():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(300))]
    counting = _CountingAdamW()
    adapter = optim.InMemory(params, counting)
    for p in params:
        p.grad = torch.ones_like(p)
    adapter.step()
    restored = optim.InMemory(params, _CountingAdamW())
    restored.load_state_dict(adapter.state_dict())
    assert restored.optimizer.updates == counting.updates == 2
    assert restored.state[params[1]]["step"] == 1


def test_group_lr_reaches_the_chunk_optimizer_and_fp32_is_required():
    p = torch.nn.Parameter(torch.randn(4, 4))
    adapter = optim.InMemory([("w", p)], optim.AdamW(lr=1e-2, weight_decay=0.0))
    adapter.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.randn(4, 4)
    adapter.step()
    assert adapter.optimizer.lr == 0.0 and torch.equal(p, before)
    with pytest.raises(ValueError, match=r"float32.*w \(torch.bfloat16\)"):
        optim.InMemory([("w", torch.nn.Parameter(torch.randn(2, dtype=torch.bfloat16)))], optim.AdamW())
