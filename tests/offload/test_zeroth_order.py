"""Streamed MeZO (ZO2-style) against a written-out in-memory MeZO with the same seeds: equal to the bit.

Reference: the model in memory, eval mode; for each step and sample, every parameter set to theta + eps*z, the
loss, then theta - eps*z, the loss, g = (loss+ - loss-) / (2 eps), and after the samples
theta <- theta - lr * (mean g*z + wd * theta) (wd only for tensors of 2+ dims). z comes from MeZO.direction, the
seeding scheme both share. The engine runs every chunk through NVMe at its minimum budget.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim

STEPS = 10


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=3, seq=12, generator=generator) for _ in range(STEPS)]


@torch.no_grad()
def _reference(path, batches, mezo: optim.MeZO) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    params = dict(model.named_parameters())  # a tied head is the embedding's Parameter: one name, one z
    for step, batch in enumerate(batches, start=1):
        theta = {name: p.detach().clone() for name, p in params.items()}
        gradients = []
        for sample in range(mezo.samples):
            losses = []
            for sign in (1, -1):
                for name, p in params.items():
                    p.data = theta[name] + mezo.direction(step, sample, name, theta[name]) * (sign * mezo.eps)
                losses.append(model(**batch, use_cache=False).loss)
            gradients.append(float((losses[0] - losses[1]) / (2 * mezo.eps)))
        for name, p in params.items():
            zs = [mezo.direction(step, sample, name, theta[name]) for sample in range(mezo.samples)]
            direction = zs[0] * gradients[0]
            for z, g in zip(zs[1:], gradients[1:]):
                direction = direction + z * g
            if mezo.samples > 1:
                direction = direction / mezo.samples
            if mezo.weight_decay != 0 and theta[name].dim() >= 2:
                direction = direction + mezo.weight_decay * theta[name]
            p.data = theta[name] - mezo.lr * direction
    return {name: p.detach() for name, p in params.items()}


def _engine(path, tmp_path, mezo: optim.MeZO, **options) -> offload.Engine:
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, mezo)
    return offload.Engine(model, mezo, offload.Budget(device=device, host=host, nvme=tmp_path / "swap"), **options)


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", {}),
        ("gpt2", {"weight_decay": 0.1}),  # tied head; position embeddings from unbatched position ids
        ("qwen2", {"samples": 2}),
        ("opt", {"samples": 2, "weight_decay": 0.05}),
    ],
)
def test_streamed_mezo_equals_in_memory_mezo(arch, options, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=1, num_hidden_layers=4)
    seed = int(torch.randint(0, 2**31, ()))
    mezo = optim.MeZO(lr=1e-3, eps=1e-3, seed=seed, **options)
    batches = _batches(seed)
    expected = _reference(path, batches, mezo)
    with _engine(path, tmp_path, mezo) as engine:
        losses = [engine.train_step(batch) for batch in batches]
        engine.export(tmp_path / "out")
    assert losses[-1] < losses[0] + 0.5  # sanity: it trains, it does not diverge
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


def test_each_block_is_read_and_written_once_per_step(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=2, num_hidden_layers=6)
    mezo = optim.MeZO(lr=1e-3, seed=3)
    with _engine(path, tmp_path, mezo) as engine:
        weight_bytes = sum(s.weights.nbytes for s in engine.blocks)
        assert sum(engine.store.limits.values()) < weight_bytes  # device + host
        per_step = []
        for batch in _batches(seed=4)[:4]:
            read, written = engine.store.bytes_read, engine.store.bytes_written
            engine.train_step(batch)
            per_step.append((engine.store.bytes_read - read, engine.store.bytes_written - written))
    for read, written in per_step[1:]:  # from step 2 on every block carries the lazy update, so every one is written
        assert 0 < read <= weight_bytes and 0 < written <= weight_bytes, (read, written, weight_bytes)


def test_mezo_refuses_gradient_options(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="MeZO takes no accumulation_steps or max_grad_norm"):
        offload.Engine(model, optim.MeZO(), offload.Budget(device="1GB", host="1GB"), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="eps=0 must be > 0"):
        optim.MeZO(eps=0)


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "in-swap"])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, storage_dtype, portable):
    """save_checkpoint applies the pending lazy update first; the resumed run goes on exactly as the first. bf16
    storage: the checkpoint's fp32 export of bf16 values loads back exactly (portable), or its bf16 chunk is
    adopted as it is (in swap), and the flushed update is rounded with the noise the lazy one would have used."""
    path = save_tiny_model("llama", tmp_path / "model", seed=5, num_hidden_layers=3)
    mezo = optim.MeZO(lr=1e-3, seed=6, samples=2, storage_dtype=storage_dtype)
    batches = _batches(seed=7)[:5]
    with _engine(path, tmp_path / "a", mezo) as engine:
        uninterrupted = [engine.train_step(b) for b in batches]
        engine.export(tmp_path / "uninterrupted")
    with _engine(path, tmp_path / "b", mezo, run_name="run") as engine:
        first = [engine.train_step(b) for b in batches[:2]]
        engine.save_checkpoint(tmp_path / "checkpoint", portable=portable)
    with _engine(path, tmp_path / "b", mezo, run_name="run", checkpoints=[tmp_path / "checkpoint"]) as engine:
        engine.load_checkpoint(tmp_path / "checkpoint")
        rest = [engine.train_step(b) for b in batches[2:]]
        engine.export(tmp_path / "resumed")
    assert first + rest == uninterrupted
    expected = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "uninterrupted").named_parameters())
    resumed = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").named_parameters())
    assert all(torch.equal(resumed[name], p) for name, p in expected.items())


def test_in_memory_mezo_optimizer_equals_the_reference(tmp_path):
    """optim.InMemoryMeZO, the torch.optim form for a model in memory, follows the same trajectory to the bit."""
    path = save_tiny_model("qwen2", tmp_path / "model", seed=8, num_hidden_layers=2)
    mezo = optim.MeZO(lr=1e-3, seed=9, samples=2, weight_decay=0.1)
    batches = _batches(seed=10)[:4]
    expected = _reference(path, batches, mezo)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    optimizer = optim.InMemoryMeZO(model.named_parameters(), optim.MeZO(lr=1e-3, seed=9, samples=2, weight_decay=0.1))
    for batch in batches:
        optimizer.step(lambda batch=batch: model(**batch, use_cache=False).loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


# ------------------------------------------------------------------------------------- weights stored in bf16


def _in_memory(path, batches, mezo: optim.MeZO) -> dict[str, torch.Tensor]:
    """optim.InMemoryMeZO on the model in memory: the reference for bf16 storage (its own tests check it keeps
    bf16 values in fp32 parameters, and fp32 storage against `_reference` above)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    optimizer = optim.InMemoryMeZO(model.named_parameters(), mezo)
    for batch in batches:
        optimizer.step(lambda batch=batch: model(**batch, use_cache=False).loss)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch, options", [("llama", {}), ("gpt2", {"samples": 2, "weight_decay": 0.1})])
def test_bf16_storage_streamed_equals_in_memory_mezo(arch, options, tmp_path):
    """bf16 chunks through NVMe at the minimum budget, fp32 compute, stochastic rounding: bit-equal to InMemoryMeZO
    with the same storage after 3 steps."""
    path = save_tiny_model(arch, tmp_path / "model", seed=11, num_hidden_layers=3)
    seed = int(torch.randint(0, 2**31, ()))
    mezo = optim.MeZO(lr=1e-3, eps=1e-3, seed=seed, storage_dtype=torch.bfloat16, **options)
    batches = _batches(seed)[:3]
    expected = _in_memory(path, batches, dataclasses.replace(mezo))
    with _engine(path, tmp_path, mezo) as engine:
        assert {state.weights.dtype for state in engine.blocks} == {torch.bfloat16}
        assert engine.compute_dtype == torch.float32
        for batch in batches:
            engine.train_step(batch)
        assert engine.store.bytes_written > 0  # the chunks went through NVMe
        engine.export(tmp_path / "out")
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


def test_bf16_storage_halves_the_weight_chunks(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=15, num_hidden_layers=2)
    meta = offload.meta_model(AutoModelForCausalLM.from_pretrained(path).config)
    fp32 = offload.Engine.state_bytes(meta, optim.MeZO())
    bf16 = offload.Engine.state_bytes(meta, optim.MeZO(storage_dtype=torch.bfloat16))
    assert bf16 == pytest.approx(fp32 / 2, rel=0.05)  # chunk padding aside
    # ... while the device floor grows by the fp32 copies of the blocks held at once
    assert offload.Engine.minimum_budget(meta, optim.MeZO(storage_dtype=torch.bfloat16))[0] > \
        offload.Engine.minimum_budget(meta, optim.MeZO())[0]


def test_one_module_is_perturbed_at_a_time(tmp_path):
    """Note [Perturbed one module at a time]: the perturbed weights alive at once are at most the largest single
    module's own parameters (a projection, the embedding), never a whole layer's, and nothing of z is kept."""
    import weakref

    alive: list[weakref.ref] = []
    most = [0]

    @dataclasses.dataclass
    class Watched(optim.MeZO):
        def perturb_into(self, z, theta, sign):
            perturbed = super().perturb_into(z, theta, sign)
            alive.append(weakref.ref(perturbed))
            most[0] = max(most[0], sum(ref().numel() for ref in alive if ref() is not None))
            return perturbed

    path = save_tiny_model("llama", tmp_path / "model", seed=2, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert largest_module < layer / 2
    with _engine(path, tmp_path, Watched(lr=1e-3, seed=3)) as engine:
        for batch in _batches(seed=4)[:2]:
            engine.train_step(batch)
    assert 0 < most[0] <= largest_module
