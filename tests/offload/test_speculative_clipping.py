"""Exact clipping by speculation (offload/updates.py, Note [Speculative updates]): every update runs in backward as if
unclipped, and is kept, rolled back and redone clipped, or rolled back and skipped once the global norm is known.

Reference: test_engine.py's `_reference`, plain PyTorch: torch.optim.AdamW in memory after
torch.nn.utils.clip_grad_norm_, fp32; compared with torch.equal. The engine runs at its minimum budget with a swap
directory, so its chunks (and the kept versions) go through the NVMe tier.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_engine import _batches, _engine, _reference
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import optim
from finetune.offload import clipping
from finetune.offload.chunks import Tier
from finetune.optim.layout import ChunkLayout

STEPS = 10


def _run(engine, batches, out) -> list[float]:
    losses = [engine.train_step(batch) for batch in batches]
    engine.export(out)
    return losses


def _assert_equal(out, reference: torch.nn.Module) -> None:
    exported = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(exported[name], p), name


def _state(engine) -> dict[str, torch.Tensor]:
    """Every chunk an update writes (weights, masters, optimizer states), copied out of the store."""
    copies = {}
    for state in engine.blocks:
        for chunk in (state.weights, state.master, *state.states.values()):
            if chunk is not None:
                copies[chunk.key] = engine.store.acquire(chunk, Tier.HOST).clone()
                engine.store.release(chunk, Tier.HOST)
    return copies


@pytest.mark.parametrize(("arch", "accumulation"), [("llama", 1), ("llama", 2), ("gpt2", 2), ("qwen2", 1)])
def test_clipped_steps_are_rolled_back_and_redone_exactly(arch, accumulation, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=0, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=11, steps=STEPS)
    reference, ref_losses, norms = _reference(path, batches, max_grad_norm=1e-2, accumulation=accumulation)
    assert min(norms) > 1e-2, "every step must be clipped for this test to mean anything"
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, max_grad_norm=1e-2, accumulation_steps=accumulation)
    try:
        losses = _run(engine, batches, tmp_path / "out")
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["bytes_written"] > 0, "the state must go through the NVMe tier"
    assert (stats["redone_steps"], stats["skipped_steps"]) == (STEPS, 0)
    assert losses == ref_losses
    _assert_equal(tmp_path / "out", reference)


def test_never_clipped_steps_commit_what_ran_in_backward(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=0, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=12, steps=STEPS)
    reference, ref_losses, norms = _reference(path, batches, max_grad_norm=1e6, accumulation=1)
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, max_grad_norm=1e6, accumulation_steps=1)
    try:
        losses = _run(engine, batches, tmp_path / "out")
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["bytes_written"] > 0
    assert (stats["redone_steps"], stats["skipped_steps"]) == (0, 0), "no update may run after backward"
    assert losses == ref_losses
    _assert_equal(tmp_path / "out", reference)


def test_some_steps_clipped_some_not(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=0, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=13, steps=STEPS)
    max_norm = 1.6
    reference, ref_losses, norms = _reference(path, batches, max_grad_norm=max_norm, accumulation=2)
    clipped = sum(norm > max_norm - 1e-6 for norm in norms)  # clip_grad_norm_'s coefficient is below 1.0
    assert 0 < clipped < STEPS, f"norms {norms} must fall on both sides of {max_norm}"
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, max_grad_norm=max_norm, accumulation_steps=2)
    try:
        losses = _run(engine, batches, tmp_path / "out")
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["redone_steps"] == clipped
    assert losses == ref_losses
    _assert_equal(tmp_path / "out", reference)


def test_a_step_with_a_gradient_norm_not_finite_is_skipped(tmp_path, monkeypatch):
    """Steps 2 and 4 (of 6) see an infinite norm: they change nothing, warn once, and the others equal the reference
    trained on the other batches, step numbers included (the skipped ones do not count)."""
    path = save_tiny_model("gpt2", tmp_path / "model", seed=0, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=14, steps=6)
    kept = [batch for i, batch in enumerate(batches) if i not in (1, 3)]
    reference, ref_losses, _ = _reference(path, kept, max_grad_norm=0.5, accumulation=1)
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, max_grad_norm=0.5, accumulation_steps=1)
    real = clipping.Clipping.global_norm
    calls = []

    def global_norm(self, blocks):
        calls.append(None)
        return torch.tensor(float("inf")) if len(calls) in (2, 4) else real(self, blocks)

    monkeypatch.setattr(clipping.Clipping, "global_norm", global_norm)
    losses = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, batch in enumerate(batches):
                before = _state(engine) if i == 1 else None
                losses.append(engine.train_step(batch))
                if before is not None:
                    after = _state(engine)
                    assert all(torch.equal(before[key], after[key]) for key in before), "a skipped step changed state"
                    assert engine.step_count == 1
        engine.export(tmp_path / "out")
        stats = engine.stats()
    finally:
        engine.close()
    skipped = [w for w in caught if "was skipped" in str(w.message)]
    assert len(skipped) == 1 and "step 2" in str(skipped[0].message)
    assert stats["skipped_steps"] == 2 and engine.step_count == 4
    assert [loss for i, loss in enumerate(losses) if i not in (1, 3)] == ref_losses
    _assert_equal(tmp_path / "out", reference)


def test_too_little_disk_for_the_kept_versions_fails_up_front(tmp_path, monkeypatch):
    from finetune.offload import floors

    class Disk:
        @staticmethod
        def disk_free(path):
            return 1

    monkeypatch.setattr(floors, "detect_hardware", lambda: Disk)
    path = save_tiny_model("llama", tmp_path / "model", seed=0)
    with pytest.raises(ValueError, match="kept version of each chunk an update writes"):
        _engine(path, tmp_path, max_grad_norm=1.0, accumulation_steps=1)


@pytest.mark.parametrize("make", [
    optim.AdamW, optim.AdamW8bit, lambda: optim.GaLore(rank=4, update_proj_gap=2),
    lambda: optim.Frugal(update_gap=2), lambda: optim.Frugal(subspace="svd", update_gap=2),
], ids=["adamw", "adamw8bit", "galore", "frugal-columns", "frugal-svd"])
def test_optimizers_redo_a_step_exactly(make):
    """A redo after a rollback runs the same step number on the same bytes: each optimizer must be a pure function
    of (master, grads, states, step), leave the gradient as it found it, and keep no state of its own that a step
    changes."""
    opt = make()
    layout = ChunkLayout.from_shapes({"a.weight": torch.Size([64, 48]), "b": torch.Size([8192]),
                                      "emb": torch.Size([32, 16])}, frozenset({"emb"}))
    generator = torch.Generator().manual_seed(0)
    params, grads = torch.randn(layout.numel, generator=generator), torch.randn(layout.numel, generator=generator)
    states = {name: torch.zeros(spec.numel, dtype=spec.dtype) for name, spec in opt.state_specs(layout).items()}
    outcomes = []
    for _ in range(2):
        p, s = params.clone(), {name: t.clone() for name, t in states.items()}
        python_state = opt.state_dict()
        for step in (1, 2, 3):
            g = grads.clone()
            opt.step(p, g, s, step=step, layout=layout)
            assert torch.equal(g, grads), "the step changed its gradient"
        assert opt.state_dict() == python_state
        outcomes.append((p, s))
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    assert all(torch.equal(outcomes[0][1][name], outcomes[1][1][name]) for name in states)
