"""The vertical schedule (offload/vertical.py) equals in-memory gradient accumulation to the bit, and reads each
block's weights and state once per step whatever the accumulation.

Reference: test_engine.py's `_reference` (torch.optim.AdamW, loss / accumulation per micro-batch, one micro-batch's
backward after another). The engine runs at its minimum budget with a swap directory, so every chunk goes through
NVMe between its uses. The models are untied (a tied embedding runs one micro-batch after another: see
`vertical_blocker`), with the tied architectures' own layouts otherwise.
"""

from __future__ import annotations

import pytest
import torch
from test_activations import _parameters_equal
from test_engine import _batches, _engine, _reference, _train_and_export
from tiny_models import ARCHITECTURES, random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim


def _check_exact(path, tmp_path, *, accumulation: int, steps: int = 2, batch: int = 4, **options) -> dict[str, int]:
    generator = torch.Generator().manual_seed(11)
    batches = [random_batch(128, batch=batch, seq=16, generator=generator) for _ in range(steps)]
    reference, ref_losses, norms = _reference(path, batches, accumulation=accumulation,
                                              max_grad_norm=options.get("max_grad_norm"))
    torch.manual_seed(1234)
    engine = _engine(path, tmp_path, accumulation_steps=accumulation, **options)
    assert engine.vertical
    losses = _train_and_export(engine, batches, tmp_path / "out")
    assert losses == ref_losses
    assert _parameters_equal(tmp_path / "out", reference)
    stats = engine.stats()
    assert stats["bytes_written"] > 0, "the state must have gone through the NVMe tier"
    return {**stats, "max_norm": max(norms)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vertical_equals_in_memory_accumulation(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=4, num_hidden_layers=3, tie_word_embeddings=False)
    _check_exact(path, tmp_path, accumulation=4)


def test_vertical_with_clipping_and_an_odd_accumulation(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=2, num_hidden_layers=4)
    stats = _check_exact(path, tmp_path, accumulation=3, steps=3, batch=6, max_grad_norm=0.5)
    assert stats["max_norm"] > 0.5, "clipping must be active for this test to mean anything"


def test_vertical_lora_equals_peft(tmp_path):
    """A peft model: the frozen embedding's output is a leaf, the adapters' gradients accumulate in order."""
    from peft import LoraConfig, get_peft_model

    path = save_tiny_model("llama", tmp_path / "model", seed=1, num_hidden_layers=3)
    batches = _batches(vocab_size=128, seed=3, steps=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    torch.manual_seed(0)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    adamw = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ref_losses = []
    for batch in batches:
        adamw.zero_grad()
        micro = [reference(**dict(zip(batch, v)), use_cache=False).loss for v in zip(*(t.chunk(2) for t in
                                                                                         batch.values()))]
        for loss in micro:
            (loss / 2).backward()
        adamw.step()
        ref_losses.append(float(torch.stack([m.detach() for m in micro]).mean()))

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    chunk_adamw = optim.AdamW(lr=1e-2, weight_decay=0.1)
    device, host = offload.Engine.minimum_budget(model, chunk_adamw, accumulation_steps=2)
    with offload.Engine(model, chunk_adamw, offload.Budget(device=device, host=host, nvme=tmp_path / "swap"),
                        accumulation_steps=2) as engine:
        assert engine.vertical
        losses = [engine.train_step(batch) for batch in batches]
        engine.save_adapter(tmp_path / "adapter")
    assert losses == ref_losses
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert len(saved) == len(expected) > 0
    for name, tensor in saved.items():
        match = [p for n, p in expected.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        assert len(match) == 1 and torch.equal(tensor, match[0]), name


def test_weights_and_state_are_read_once_per_step_whatever_the_accumulation(tmp_path):
    """NVMe bytes per step at accumulation 4 against accumulation 1, the same model, batch and budget (the
    budget of accumulation 4, the larger one)."""
    path = save_tiny_model("llama", tmp_path / "model", seed=0, num_hidden_layers=6)
    batches = _batches(vocab_size=128, seed=1, steps=3)
    moved = {}
    for accumulation, vertical in ((1, None), (4, True), (4, False)):
        model = AutoModelForCausalLM.from_pretrained(path)
        adamw = optim.AdamW(lr=1e-3)
        device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=4)
        budget = offload.Budget(device=device, host=host, nvme=tmp_path / f"swap{accumulation}{vertical}")
        with offload.Engine(model, adamw, budget, accumulation_steps=accumulation, vertical=vertical) as engine:
            engine.train_step(batches[0])  # the first step writes the state's files: measure the steps after it
            before = engine.stats()
            for batch in batches[1:]:
                engine.train_step(batch)
            after = engine.stats()
        moved[accumulation, vertical] = {key: after[key] - before[key] for key in ("bytes_read", "bytes_written")}
    once, vertical, horizontal = moved[1, None], moved[4, True], moved[4, False]
    assert vertical["bytes_read"] <= 1.15 * once["bytes_read"], moved
    assert vertical["bytes_written"] <= 1.15 * once["bytes_written"], moved
    assert horizontal["bytes_read"] > 2 * once["bytes_read"], "the comparison must mean something"


def test_where_the_vertical_schedule_would_not_be_exact_micro_batches_run_one_after_another(tmp_path):
    tied = save_tiny_model("gpt2", tmp_path / "tied")
    dropout = save_tiny_model("llama", tmp_path / "dropout", attention_dropout=0.1)
    untied = save_tiny_model("llama", tmp_path / "untied")
    cases = [(tied, {}, "ties its input embedding"), (dropout, {}, "dropout"),
             (untied, {"activations": "keep"}, 'activations="keep"')]
    for path, options, reason in cases:
        engine = _engine(path, tmp_path / "a", accumulation_steps=2, **options)
        assert not engine.vertical
        engine.close()
        with pytest.raises(ValueError, match=reason):
            _engine(path, tmp_path / "b", accumulation_steps=2, vertical=True, **options)
    engine = _engine(untied, tmp_path / "c", accumulation_steps=1)
    assert not engine.vertical, "one micro-batch has nothing to schedule"
    engine.close()


def test_a_failing_micro_batch_raises_on_the_caller_thread(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    engine = _engine(path, tmp_path, accumulation_steps=2)
    batch = _batches(vocab_size=128, seed=0, steps=1)[0]
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][3, 0] = 10**6  # the second micro-batch's token is outside the vocabulary
    with pytest.raises(IndexError):
        engine.train_step(batch)


def test_auto_activations_take_the_vertical_schedule_under_accumulation(tmp_path):
    """"auto" with accumulation recomputes where that allows the vertical schedule (one read of every block a step),
    whatever offloading would have saved; a tied model, which cannot take it, is decided as before."""
    untied = save_tiny_model("llama", tmp_path / "untied")
    engine = _engine(untied, tmp_path / "a", accumulation_steps=2, activations="auto")
    assert engine.vertical and engine.activations.value == "recompute"
    engine.close()
    engine = _engine(untied, tmp_path / "b", accumulation_steps=2, activations="auto", vertical=False)
    assert not engine.vertical
    engine.close()
