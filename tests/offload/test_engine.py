"""The engine's guard: streamed training equals plain in-memory PyTorch training (torch.optim.AdamW, fp32).

Reference: the same model loaded again with from_pretrained, trained in memory with torch.optim.AdamW,
loss / accumulation per micro-batch, torch.nn.utils.clip_grad_norm_ before the step. Every state chunk is
forced through the NVMe tier: the budget (device + host) is the engine's minimum, below a quarter of the state.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import ARCHITECTURES, random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim

LR, WEIGHT_DECAY, STEPS, ACCUMULATION = 1e-2, 0.1, 5, 2


def _batches(vocab_size: int, seed: int, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(vocab_size, batch=4, seq=16, generator=generator) for _ in range(steps)]


def _reference(
    path, batches, *, max_grad_norm=None, accumulation=ACCUMULATION
) -> tuple[torch.nn.Module, list[float], list[float]]:
    """Plain PyTorch: returns the model, the mean loss per step and the gradient norm per step."""
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses, norms = [], []
    for batch in batches:
        optimizer.zero_grad()
        micro_losses = []
        for values in zip(*(v.chunk(accumulation) for v in batch.values())):
            loss = model(**dict(zip(batch, values)), use_cache=False).loss
            (loss / accumulation).backward()
            micro_losses.append(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        norms.append(float(norm))
        optimizer.step()
        losses.append(float(torch.stack(micro_losses).mean()))  # as the engine averages: comparable to the bit
    return model, losses, norms


def _engine(path, tmp_path, **options) -> offload.Engine:
    model = AutoModelForCausalLM.from_pretrained(path)
    adamw = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    options = {"accumulation_steps": ACCUMULATION, **options}
    device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=options["accumulation_steps"])
    budget = offload.Budget(device=device, host=host, nvme=tmp_path / "swap")
    return offload.Engine(model, adamw, budget, **options)


def _train_and_export(engine: offload.Engine, batches, out) -> list[float]:
    """Run every batch through the engine, export to `out`, close; returns the step losses."""
    losses = [engine.train_step(batch) for batch in batches]
    engine.export(out)
    engine.close()
    return losses


def _max_difference(engine_dir, reference: torch.nn.Module) -> float:
    exported = AutoModelForCausalLM.from_pretrained(engine_dir)
    expected = dict(reference.named_parameters())
    return max((p - expected[name]).abs().max().item() for name, p in exported.named_parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_through_nvme_equals_in_memory_adamw(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=0, num_hidden_layers=12)
    batches = _batches(vocab_size=128, seed=hash(arch) % 1000)
    reference, ref_losses, norms = _reference(path, batches, max_grad_norm=0.5)
    assert max(norms) > 0.5, "clipping must be active for this test to mean anything"

    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, max_grad_norm=0.5)
    state_bytes = sum(p.numel() for p in reference.parameters()) * 16
    assert sum(engine.store.limits.values()) < state_bytes / 4
    losses = _train_and_export(engine, batches, tmp_path / "out")
    assert engine.stats()["bytes_written"] > state_bytes, "the state must have gone through the NVMe tier"

    assert _max_difference(tmp_path / "out", reference) <= 1e-6
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unclipped_updates_overlap_backward_and_stay_exact(arch, tmp_path):
    """Without clipping each layer's update runs on the worker during backward (the Fuyou path)."""
    path = save_tiny_model(arch, tmp_path / "model", seed=3, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=7)
    reference, _, _ = _reference(path, batches)
    _train_and_export(_engine(path, tmp_path), batches, tmp_path / "out")
    assert _max_difference(tmp_path / "out", reference) <= 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_kept_activations_without_recompute_stay_exact(arch, tmp_path):
    """activations="keep" keeps each layer's graph; saved weight views are re-made from the block's
    buffer at backward, after the block was evicted to NVMe and loaded into a reused buffer in between."""
    path = save_tiny_model(arch, tmp_path / "model", seed=3, num_hidden_layers=6)
    batches = _batches(vocab_size=128, seed=int(torch.randint(0, 2**31, ())))
    reference, ref_losses, _ = _reference(path, batches, max_grad_norm=0.5)
    engine = _engine(path, tmp_path, activations="keep", max_grad_norm=0.5)
    losses = _train_and_export(engine, batches, tmp_path / "out")
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)
    assert _max_difference(tmp_path / "out", reference) <= 1e-6


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "opt"])
def test_tied_head_without_accumulation_stays_exact(arch, tmp_path):
    """Without accumulation the tied head gets its own Parameter object over the embedding's chunk (its gradient
    goes into the chunk at once instead of waiting in autograd): still equal to in-memory training."""
    path = save_tiny_model(arch, tmp_path / "model", seed=4, num_hidden_layers=3)
    batches = _batches(vocab_size=128, seed=int(torch.randint(0, 2**31, ())))
    reference, ref_losses, _ = _reference(path, batches, max_grad_norm=0.5, accumulation=1)
    engine = _engine(path, tmp_path, accumulation_steps=1, max_grad_norm=0.5)
    assert any(s.aliases for s in engine.blocks), "the tied head should have a twin Parameter"
    losses = _train_and_export(engine, batches, tmp_path / "out")
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)
    assert _max_difference(tmp_path / "out", reference) <= 1e-6


@pytest.mark.parametrize("activations", ["recompute", "keep"])
def test_dropout_is_exact_with_and_without_recompute(activations, tmp_path):
    """GPT-2 with dropout: a recomputed layer must draw the same masks as its forward did (RNG replay)."""
    path = save_tiny_model("gpt2", tmp_path / "model", seed=0, resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.2)
    batches = _batches(vocab_size=128, seed=11, steps=3)
    reference, ref_losses, _ = _reference(path, batches)
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, activations=activations)
    losses = _train_and_export(engine, batches, tmp_path / "out")
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)
    assert _max_difference(tmp_path / "out", reference) <= 1e-6


def test_per_block_clipping_matches_written_out_reference(tmp_path):
    """PER_BLOCK mode: each block clipped to max_norm * sqrt(block numel / model numel), then AdamW."""
    path = save_tiny_model("llama", tmp_path / "model", seed=5, num_hidden_layers=3)
    batches = _batches(vocab_size=128, seed=13, steps=3)
    max_norm = 0.3

    model = AutoModelForCausalLM.from_pretrained(path)
    blocks = offload.find_blocks(model).blocks
    total = sum(b.numel for b in blocks)
    adamw = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    clipped_any = False
    for batch in batches:
        adamw.zero_grad()
        for micro in [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]:
            (model(**micro, use_cache=False).loss / ACCUMULATION).backward()
        for block in blocks:
            grads = [p.grad for p in block.params.values()]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            threshold = max_norm * (block.numel / total) ** 0.5
            clipped_any |= bool(norm > threshold)
            coefficient = torch.clamp(threshold / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coefficient)
        adamw.step()
    assert clipped_any

    _train_and_export(_engine(path, tmp_path, max_grad_norm=max_norm, clip_mode="per-block"), batches, tmp_path / "out")
    assert _max_difference(tmp_path / "out", model) <= 1e-6


def test_from_pretrained_streams_weights_and_matches(tmp_path):
    """Engine.from_pretrained builds on meta and reads each block from safetensors: same result."""
    path = save_tiny_model("qwen2", tmp_path / "model", seed=2, num_hidden_layers=4)
    batches = _batches(vocab_size=128, seed=17, steps=3)
    reference, ref_losses, _ = _reference(path, batches)
    adamw = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    budget = offload.Budget(device="1MB", host="1MB", nvme=tmp_path / "swap")
    with offload.Engine.from_pretrained(path, adamw, budget, accumulation_steps=ACCUMULATION) as engine:
        losses = [engine.train_step(batch) for batch in batches]
        torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)
        eval_batch = _batches(vocab_size=128, seed=19, steps=1)[0]
        reference.eval()
        with torch.no_grad():
            expected = reference(**eval_batch, use_cache=False).loss.item()
        assert abs(engine.eval_loss(eval_batch) - expected) <= 1e-6


def test_export_round_trip_logits(tmp_path):
    path = save_tiny_model("opt", tmp_path / "model", seed=4)
    engine = _engine(path, tmp_path)
    batch = _batches(vocab_size=128, seed=23, steps=1)[0]
    engine.train_step(batch)
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(input_ids=batch["input_ids"], use_cache=False).logits
    engine.export(tmp_path / "out")
    engine.close()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=batch["input_ids"]).logits, logits, rtol=0, atol=1e-5)


def test_budget_below_the_largest_block_is_refused_with_the_minimum(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, optim.AdamW())
    budget = offload.Budget(device=device - 1, host=host, nvme=tmp_path / "swap")
    with pytest.raises(ValueError, match=f"raise it to at least {offload.format_bytes(device)}"):
        offload.Engine(model, optim.AdamW(), budget)


def test_state_larger_than_ram_budget_needs_nvme(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, optim.AdamW())
    with pytest.raises(ValueError, match="no NVMe directory was given"):
        offload.Engine(model, optim.AdamW(), offload.Budget(device=device, host=host))


def test_swap_directory_without_room_for_the_state_is_refused(tmp_path, monkeypatch):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, optim.AdamW())
    total = offload.Engine.state_bytes(model, optim.AdamW())
    assert total > device + host
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=total - 1))
    with pytest.raises(ValueError, match=r"Budget.nvme=.* has .* free but the swap files can grow to"):
        # exact clipping keeps every gradient chunk to the end of backward: all of the state may be swapped
        offload.Engine(model, optim.AdamW(), offload.Budget(device=device, host=host, nvme=tmp_path / "swap"),
                       max_grad_norm=1.0)


@pytest.mark.parametrize(
    "options, refused",
    [
        ({}, False),  # no clipping: each block's update right after its backward
        ({"max_grad_norm": 1.0, "clip_mode": "per-block"}, False),
        # exact clipping: its gradients are consumed too, but its speculative updates keep a version of each chunk
        # they write until the norm is known
        ({"max_grad_norm": 1.0}, True),
        ({"accumulation_steps": 2}, True),  # gradients kept from one micro-batch to the next
    ],
)
def test_gradients_consumed_inside_backward_need_no_swap_room(tmp_path, monkeypatch, options, refused):
    """The free space passes the check only because the gradient chunks are not counted (but those that may wait
    for their updates at once), where each is consumed by its update right after its block's backward. The run
    then trains at the minimum budget; a gradient that spilled while it waited has its file removed once used."""
    from finetune.offload.floors import model_floors

    path = save_tiny_model("llama", tmp_path / "model", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(path)
    need = model_floors(model, optim.AdamW(), torch.float32, None)
    waiting = need.state - need.grads + need.grads_waiting
    assert 0 < need.grads_waiting < need.grads < need.state and need.device + need.host < waiting
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=waiting))
    budget = offload.Budget(device=need.device, host=need.host, nvme=tmp_path / "swap")
    if refused:
        with pytest.raises(ValueError, match=r"has .* free but the swap files can grow to .* \(every chunk"):
            offload.Engine(model, optim.AdamW(), budget, **options)
        return
    with offload.Engine(model, optim.AdamW(), budget, keep_swap=True, **options) as engine:
        for batch in _batches(128, seed=3, steps=3):
            engine.train_step(batch)
        assert engine.store.bytes_written > 0  # it streamed through the swap directory
        area = engine.swap_directory
    assert not [name for name in area.iterdir() if "grads" in name.name]


def test_bad_options_are_reported_together(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="prefetch=-1.*accumulation_steps=0.*max_grad_norm=0"):
        offload.Engine(model, optim.AdamW(), prefetch=-1, accumulation_steps=0, max_grad_norm=0)


def test_batch_not_divisible_by_accumulation(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    engine = _engine(path, tmp_path)
    batch = random_batch(128, batch=3, seq=8)
    with pytest.raises(ValueError, match="not divisible by accumulation_steps=2"):
        engine.train_step(batch)
    engine.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_embedding_weights_are_marked_in_layouts(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=0)
    with _engine(path, tmp_path) as engine:
        marked = {slot.name for s in engine.blocks for slot in s.layout.slots if slot.embedding}
        model = AutoModelForCausalLM.from_pretrained(path)
    expected = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert marked == expected and marked


@pytest.mark.parametrize(
    ("arch", "tied", "accumulation", "max_grad_norm"),
    [("llama", False, 1, None), ("llama", False, 1, 0.5), ("qwen2", True, 1, 0.5), ("qwen2", True, 2, 0.5)],
)
def test_outer_blocks_leave_after_their_own_backward_and_stay_exact(arch, tied, accumulation, max_grad_norm,
                                                                    tmp_path):
    """The device minimum no longer counts the embedding and head beside a layer (outer_holds.py): the head's
    blocks are released once their own backward is done, before the layers need the room. At that minimum a
    head held on would not fit. Under accumulation a tied weight is one Parameter that accumulates only at the
    end, so its block is held through backward and the minimum counts it beside a layer again."""
    path = save_tiny_model(arch, tmp_path / "model", seed=5, num_hidden_layers=4, tie_word_embeddings=tied,
                           vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(path)
    adamw = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=accumulation)
    embedding = model.get_input_embeddings().weight.numel()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    held_through = 2 * 4 * (embedding + layer)  # weights and gradients, fp32
    assert (device >= held_through) == (tied and accumulation > 1)
    batches = _batches(vocab_size=512, seed=int(torch.randint(0, 2**31, ())), steps=3)
    reference, ref_losses, _ = _reference(path, batches, max_grad_norm=max_grad_norm, accumulation=accumulation)
    engine = offload.Engine(model, adamw, offload.Budget(device=device, host=host, nvme=tmp_path / "swap"),
                            accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
    losses = _train_and_export(engine, batches, tmp_path / "out")
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)
    assert _max_difference(tmp_path / "out", reference) <= 1e-6
