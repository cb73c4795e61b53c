"""8-bit AdamW against its reference, bitsandbytes.optim.AdamW8bit on CPU: params, codes and absmax equal to the bit.

Embeddings get bitsandbytes' 32-bit AdamW in the reference, as the Hugging Face Trainer registers them.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from streamed import (
    batches,
    block_layouts,
    flatten,
    max_difference,
    train_in_memory,
    train_streamed,
    zero_state,
)
from tiny_models import save_tiny_model

from finetune import optim
from finetune.offload import OPTIMIZER_PREFIX, safetensors_index
from finetune.optim import adamw8bit
from finetune.optim.adamw8bit import state_plan
from finetune.optim.layout import ChunkLayout, chunk_nbytes

LR, WEIGHT_DECAY, STEPS = 1e-2, 0.1, 5


def _reference(named: dict[str, torch.nn.Parameter], embeddings: frozenset[str], **options) -> list:
    """bitsandbytes' optimizers as the HF Trainer sets them up: AdamW8bit, embeddings on 32-bit AdamW."""
    quantized = [p for name, p in named.items() if name not in embeddings]
    full = [p for name, p in named.items() if name in embeddings]
    references = [bnb.optim.AdamW8bit(quantized, lr=LR, weight_decay=WEIGHT_DECAY, **options)]
    if full:
        references.append(bnb.optim.AdamW(full, lr=LR, weight_decay=WEIGHT_DECAY, optim_bits=32))
    return references


def _assert_state_equal(ours: optim.AdamW8bit, layout: ChunkLayout, state: dict, reference_state: dict) -> int:
    """Codes, absmax and fp32 moments of every tensor equal bitsandbytes'; returns how many were quantized."""
    plan = state_plan(layout, ours.min_8bit_size, ours.fp32_embeddings)
    for slot, region in plan.quantized:
        theirs, start = reference_state[slot.name], region.offset // 256
        blocks = theirs["absmax1"].numel()
        assert torch.equal(region.view(state["exp_avg_codes"]), theirs["state1"].flatten()), slot.name
        assert torch.equal(region.view(state["exp_avg_sq_codes"]), theirs["state2"].flatten()), slot.name
        assert torch.equal(state["exp_avg_absmax"][start : start + blocks], theirs["absmax1"]), slot.name
        assert torch.equal(state["exp_avg_sq_absmax"][start : start + blocks], theirs["absmax2"]), slot.name
    for slot, region in plan.full:
        theirs = reference_state[slot.name]
        assert theirs["state1"].dtype == torch.float32, f"{slot.name} must have fp32 state in the reference too"
        assert torch.equal(region.view(state["exp_avg"]), theirs["state1"].flatten()), slot.name
        assert torch.equal(region.view(state["exp_avg_sq"]), theirs["state2"].flatten()), slot.name
    return len(plan.quantized)


@pytest.mark.parametrize("piece", [None, 512], ids=["whole", "in-pieces"])
@pytest.mark.parametrize(
    "options", [{}, {"min_8bit_size": 0, "fp32_embeddings": False}], ids=["default-rules", "all-quantized"]
)
def test_random_tensors_equal_bitsandbytes(options, piece, monkeypatch):
    """`piece`: tensors updated in pieces of 512 elements (Note [Updated in pieces]), so every tensor here spans
    several, one with a partial last block, against bitsandbytes updating each tensor whole."""
    if piece is not None:
        monkeypatch.setattr(adamw8bit, "UPDATE_PIECE", piece)
    shapes = {
        "proj.weight": torch.Size([96, 64]),  # 24 whole blocks
        "odd.weight": torch.Size([4099]),  # a partial last block
        "norm.weight": torch.Size([30, 7]),  # under 4096 elements: fp32 by default
        "embed.weight": torch.Size([80, 64]),  # an embedding: fp32 by default
    }
    embeddings = frozenset({"embed.weight"}) if options.get("fp32_embeddings", True) else frozenset()
    layout = ChunkLayout.from_shapes(shapes, frozenset({"embed.weight"}))
    generator = torch.Generator().manual_seed(0)
    initial = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    named = {name: torch.nn.Parameter(t.clone()) for name, t in initial.items()}
    bnb_options = {"min_8bit_size": options["min_8bit_size"]} if "min_8bit_size" in options else {}
    references = _reference(named, embeddings, **bnb_options)
    ours = optim.AdamW8bit(lr=LR, weight_decay=WEIGHT_DECAY, **options)
    params, state = flatten(initial, layout), zero_state(ours, layout)
    for step in range(1, STEPS + 1):
        grads = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        for name, p in named.items():
            p.grad = grads[name]
        for reference in references:
            reference.step()
        ours.step(params, flatten(grads, layout), state, step=step, layout=layout)
    for slot in layout.slots:
        assert torch.equal(slot.view(params), named[slot.name].detach()), slot.name
    reference_state = {name: references[0].state.get(p) or references[-1].state[p] for name, p in named.items()}
    quantized = _assert_state_equal(ours, layout, state, reference_state)
    assert quantized == (2 if not options else 4)


def test_state_bytes_per_parameter_of_a_model_sized_block():
    """A Llama-2-7B decoder layer (202M parameters): 2 bytes of codes + 8/256 of absmax, norms in fp32."""
    hidden, intermediate = 4096, 11008
    shapes = {f"self_attn.{n}.weight": torch.Size([hidden, hidden]) for n in "qkvo"}
    shapes |= {f"mlp.{n}_proj.weight": torch.Size([intermediate, hidden]) for n in ("gate", "up")}
    shapes |= {"mlp.down_proj.weight": torch.Size([hidden, intermediate])}
    shapes |= {f"{n}_layernorm.weight": torch.Size([hidden]) for n in ("input", "post_attention")}
    layout = ChunkLayout.from_shapes(shapes)
    specs = optim.AdamW8bit().state_specs(layout)
    per_param = sum(chunk_nbytes(s.numel, s.dtype) for s in specs.values()) / sum(s.numel for s in layout.slots)
    print(f"\nAdamW8bit state bytes per parameter, Llama-2-7B layer: {per_param:.4f}")
    assert per_param <= 2.1


def test_streamed_through_nvme_equals_bitsandbytes(tmp_path):
    """A 4-layer Llama (hidden 64, so most matrices have >= 4096 elements) streamed with all state through NVMe."""
    path = save_tiny_model(
        "llama", tmp_path / "model", seed=4, num_hidden_layers=4, hidden_size=64, intermediate_size=128
    )
    data = batches(STEPS, seed=21)
    ours = optim.AdamW8bit(lr=LR, weight_decay=WEIGHT_DECAY)
    engine = train_streamed(path, ours, data, tmp_path / "swap", tmp_path / "out", checkpoint=tmp_path / "ckpt")
    assert engine.stats()["bytes_written"] > 0, "the state must have gone through the NVMe tier"

    model, references = train_in_memory(
        path, lambda model: _MultiStep(_reference(dict(model.named_parameters()), optim.embedding_names(model))), data
    )
    assert max_difference(tmp_path / "out", model) == 0.0
    named = dict(model.named_parameters())
    reference_state = {
        name: next(r.state[p] for r in references.optimizers if p in r.state) for name, p in named.items()
    }
    index = safetensors_index(tmp_path / "ckpt", OPTIMIZER_PREFIX)
    quantized = 0
    for block, layout in block_layouts(model).items():
        state = {}
        for name in ours.state_specs(layout):
            with safe_open(index[f"{block}/{name}"], framework="pt") as file:
                state[name] = file.get_tensor(f"{block}/{name}")
        quantized += _assert_state_equal(ours, layout, state, reference_state)
    assert quantized >= 4 * 5, "most matrices must have been quantized for this test to mean anything"


class _MultiStep:
    """Steps several torch optimizers as one (bitsandbytes' 8-bit and 32-bit AdamW side by side)."""

    def __init__(self, optimizers: list) -> None:
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
