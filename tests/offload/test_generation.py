"""Generation through the engine: the tokens of `Engine.generate` equal `model.generate` on the same weights in
memory, for the full model and for a LoRA adapter on the streamed base, with every tier at its minimum budget
(each decoding step reads every block from the model's files again)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from finetune import offload, optim
from finetune.cli.lora import wrap_saved_adapter

peft = pytest.importorskip("peft")

ARCHITECTURES = ("llama", "qwen2", "gpt2")
NEW_TOKENS = 12
LAYERS = 6  # enough that the minimum budget is well below the weights


def _engine(model: torch.nn.Module, weights: Path, swap: Path) -> offload.Engine:
    """An engine at its minimum budget over `model` (frozen for generation)."""
    offload.freeze_for_generation(model)
    device, host = offload.Engine.minimum_budget(model, optim.AdamW())
    return offload.Engine(model, optim.AdamW(), offload.Budget(device=device, host=host, nvme=swap), weights=weights)


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(seed))


def _decode(generate, prompt: torch.Tensor, sample: bool) -> torch.Tensor:
    torch.manual_seed(11)
    options = {"do_sample": True, "temperature": 0.9, "top_k": 20} if sample else {"do_sample": False}
    return generate(prompt, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None, **options)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_equals_model_generate(arch: str, tmp_path: Path) -> None:
    path = save_tiny_model(arch, tmp_path / "model", seed=int(torch.randint(0, 2**16, ())), num_hidden_layers=LAYERS)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    weights = sum(p.numel() * p.element_size() for p in reference.parameters())
    model = offload.meta_model(AutoConfig.from_pretrained(path))
    with _engine(model, path, tmp_path / "swap") as engine:
        for sample in (False, True):
            prompt = _prompt(int(torch.randint(0, 2**16, ())))
            want = _decode(reference.generate, prompt, sample)
            got = _decode(engine.generate, prompt, sample)
            assert torch.equal(got, want), (arch, sample)
        stats = engine.stats()
    assert stats["peak_device"] + stats["peak_host"] < weights  # never the whole model at once
    assert stats["bytes_read"] > 2 * NEW_TOKENS * weights  # every step read the blocks again
    assert stats["bytes_written"] == 0  # frozen weights are never swapped


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_with_an_adapter_equals_peft(arch: str, tmp_path: Path) -> None:
    path = save_tiny_model(arch, tmp_path / "model", seed=3)
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a missing adapter
        for name, parameter in reference.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    reference.save_pretrained(tmp_path / "adapter")
    reference.eval()
    model = wrap_saved_adapter(offload.meta_model(AutoConfig.from_pretrained(path)), tmp_path / "adapter")
    with _engine(model, path, tmp_path / "swap") as engine:
        engine.load_adapter(tmp_path / "adapter")
        prompt = _prompt(5)
        got = _decode(engine.generate, prompt, sample=False)
    want = _decode(reference.generate, prompt, sample=False)
    with reference.disable_adapter():
        base = _decode(reference.generate, prompt, sample=False)
    assert torch.equal(got, want)
    assert not torch.equal(want, base)  # the adapter changes the tokens, so the test sees it


def test_the_engine_goes_back_to_training_after_generating(tmp_path: Path) -> None:
    path = save_tiny_model("llama", tmp_path / "model")
    model = offload.meta_model(AutoConfig.from_pretrained(path))
    with offload.Engine(model, optim.AdamW(), weights=path) as engine:
        engine.generate(_prompt(0), max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert model.training


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_cache_bytes_are_what_the_cache_holds(arch: str) -> None:
    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config).eval()
    cache = DynamicCache(config=config)
    tokens = 9
    with torch.no_grad():
        model(torch.randint(3, 100, (2, tokens)), past_key_values=cache, use_cache=True)
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert offload.kv_cache_bytes(config, tokens, batch=2, dtype=torch.float32) == held


def test_the_cache_comes_out_of_the_device_tier() -> None:
    budget = offload.without_kv_cache(offload.Budget(device="64MB", host="1GB"), 16 << 20, torch.device("cpu"))
    assert (budget.device, budget.host) == (48 << 20, 1 << 30)
    with pytest.raises(ValueError, match="KV cache"):
        offload.without_kv_cache(offload.Budget(device="8MB", host="1GB"), 16 << 20, torch.device("cpu"))
