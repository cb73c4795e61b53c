"""offload.merge_adapter: a LoRA adapter merged into its base model from the files, one tensor at a time.

Reference: peft's own merge of the same adapter in memory, `PeftModel.merge_and_unload()` (fp32), for the
weights, and the unmerged PeftModel's forward for the logits. Every adapter tensor is drawn at random (peft
starts lora_B at zero, which would let a merge that drops the update pass).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune.offload import merge as merge_module
from finetune.offload import merge_adapter, safetensors_index

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _adapter(base: Path, path: Path, seed: int = 0, **lora: object) -> torch.nn.Module:
    """A peft LoRA model on `base` with every trainable tensor random, saved to `path` with save_pretrained."""
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # LoRA A and B, trained biases, modules_to_save copies
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / 32)
    model.save_pretrained(path)
    return model.eval()


def _assert_merged_equals_peft(model: torch.nn.Module, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """`out` loads as a model equal to peft's merge_and_unload() of `model` (cast to `dtype`), and in fp32 gives
    the PeftModel's logits."""
    input_ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected_logits = model(input_ids=input_ids).logits
    reference = model.merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    state = merged.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor.to(dtype).float(), rtol=0, atol=1e-6, msg=name)
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=input_ids).logits, expected_logits, rtol=0, atol=1e-5)


def _stored_names(directory: Path) -> set[str]:
    return set(safetensors_index(directory))


def test_llama_all_projections_and_modules_to_save(llama: Path, tmp_path: Path) -> None:
    model = _adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                     modules_to_save=["lm_head"])
    (tmp_path / "merged").mkdir()  # an empty output directory is taken
    assert merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged") == tmp_path / "merged"
    assert _stored_names(tmp_path / "merged") == _stored_names(llama)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"
    _assert_merged_equals_peft(model, tmp_path / "merged")


@pytest.mark.parametrize("bare", [False, True], ids=["lm-checkpoint", "bare-checkpoint"])
def test_gpt2_conv1d_with_lora_only_biases(bare: bool, tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as (in, out), square for attn.c_proj. bare: the base was saved from GPT2Model, as
    GPT-2 is on the hub (`h.0...`, no `transformer.` prefix)."""
    base = save_tiny_model("gpt2", tmp_path / "gpt2")
    if bare:
        AutoModelForCausalLM.from_pretrained(base).transformer.save_pretrained(tmp_path / "bare")
        base = tmp_path / "bare"
    model = _adapter(base, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                     bias="lora_only")  # fan_in_fan_out left False: peft sets it True on meeting Conv1D
    merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert _stored_names(tmp_path / "merged") == _stored_names(base)
    _assert_merged_equals_peft(model, tmp_path / "merged")


@pytest.mark.parametrize(
    "lora",
    [
        {"use_rslora": True},
        {
            "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            "alpha_pattern": {"v_proj": 3, "model.layers.0.self_attn.o_proj": 32},
        },
    ],
    ids=["rslora", "rank-and-alpha-pattern"],
)
def test_scaling_options(lora: dict[str, object], llama: Path, tmp_path: Path) -> None:
    model = _adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, **lora)
    merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged")
    _assert_merged_equals_peft(model, tmp_path / "merged")


def test_sharded_tied_base_with_lora_bias_to_bf16(tmp_path: Path) -> None:
    """Qwen2: tied head (not stored), q/k/v biases that lora_bias=True moves; base in shards, output bf16 shards."""
    AutoModelForCausalLM.from_pretrained(save_tiny_model("qwen2", tmp_path / "qwen2")).save_pretrained(
        tmp_path / "sharded", max_shard_size="40KB"
    )
    base = tmp_path / "sharded"
    assert len(set(safetensors_index(base).values())) > 1 and "lm_head.weight" not in _stored_names(base)
    model = _adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                     lora_bias=True)
    merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", dtype=torch.bfloat16, max_shard_size=20_000)
    index = safetensors_index(tmp_path / "merged")
    assert index.keys() == _stored_names(base) and len(set(index.values())) > 1
    with safe_open(index["model.layers.0.self_attn.q_proj.weight"], framework="pt") as file:
        assert file.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_merged_equals_peft(model, tmp_path / "merged", dtype=torch.bfloat16)


def test_streams_one_base_tensor_at_a_time(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each base tensor is read once, and at most two are alive at any time (the one the shard writer is
    writing, the next being merged): loading the whole model first would hold them all."""
    _adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    base_files = set(safetensors_index(llama).values())
    reads: list[str] = []
    alive: list[int] = [0, 0]  # now, peak

    def released() -> None:
        alive[0] -= 1

    class CountingFile:
        """safe_open that counts the base tensors it hands out and how many of them are still referenced."""

        def __init__(self, path: Path, framework: str) -> None:
            self.file, self.counted = safe_open(path, framework=framework), Path(path) in base_files

        def __enter__(self) -> CountingFile:
            self.file.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.__exit__(*exc)

        def __getattr__(self, name: str) -> object:
            return getattr(self.file, name)

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor = self.file.get_tensor(name)
            if self.counted:
                reads.append(name)
                alive[0] += 1
                alive[1] = max(alive)
                weakref.finalize(tensor, released)
            return tensor

    monkeypatch.setattr(merge_module, "safe_open", CountingFile)
    merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(reads) == sorted(_stored_names(llama))
    assert alive[1] <= 2, f"{alive[1]} base tensors alive at once"


def _dora(llama: Path, adapter: Path) -> None:
    _adapter(llama, adapter, r=4, target_modules=["q_proj"], use_dora=True)


def _embedding_lora(llama: Path, adapter: Path) -> None:
    _adapter(llama, adapter, r=4, target_modules=["embed_tokens", "q_proj"])


def _wider_base(llama: Path, adapter: Path) -> None:
    wide = save_tiny_model("llama", adapter.parent / "wide", hidden_size=64, intermediate_size=128)
    _adapter(wide, adapter, r=4, target_modules=["q_proj"])


def _gpt2_adapter(llama: Path, adapter: Path) -> None:
    _adapter(save_tiny_model("gpt2", adapter.parent / "gpt2"), adapter, r=4, target_modules=["c_attn"])


def _lora_a_alone(llama: Path, adapter: Path) -> None:
    _adapter(llama, adapter, r=4, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    save_file({key: tensor for key, tensor in load_file(weights).items() if ".lora_B." not in key}, weights)


def _no_weights(llama: Path, adapter: Path) -> None:
    _adapter(llama, adapter, r=4, target_modules=["q_proj"])
    (adapter / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize(
    ("make_adapter", "error"),
    [
        (_dora, "use_dora=True"),
        (_embedding_lora, "lora_embedding_A.*not plain LoRA"),
        (_wider_base, "shape.*is the adapter for this base"),
        (_gpt2_adapter, "c_attn.*does not hold; is the adapter for this base"),
        (_lora_a_alone, "lora_A.weight without its lora_A/lora_B pair"),
        (_no_weights, "no adapter_model.safetensors"),
    ],
    ids=["dora", "embedding-lora", "shape-mismatch", "wrong-base", "lora-a-alone", "missing-file"],
)
def test_refusals_write_nothing(
    make_adapter: Callable[[Path, Path], None], error: str, llama: Path, tmp_path: Path
) -> None:
    make_adapter(llama, tmp_path / "adapter")
    with pytest.raises(ValueError, match=error):
        merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged")
    assert not [path.name for path in tmp_path.iterdir() if "merged" in path.name]  # nor a .merged.partial


def test_non_empty_output_is_left_unchanged(llama: Path, tmp_path: Path) -> None:
    _adapter(llama, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not empty; choose a new directory"):
        merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged")
    assert [path.name for path in (tmp_path / "merged").iterdir()] == ["notes.txt"]
    assert (tmp_path / "merged" / "notes.txt").read_text() == "keep"


def test_base_without_weights_is_refused(llama: Path, tmp_path: Path) -> None:
    _adapter(llama, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_non_float_dtype_is_refused(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype=torch.int8 is not a float"):
        merge_adapter(llama, tmp_path / "adapter", tmp_path / "merged", dtype=torch.int8)
