"""GaLore against its reference, galore_torch.GaLoreAdamW: max abs difference <= 1e-6 over steps spanning refreshes.

The reference gets the projectable matrices in a group with rank / update_proj_gap / scale / proj_type "std" and
every other tensor in a plain group, as the GaLore training scripts set it up.
"""

from __future__ import annotations

import warnings

import galore_torch
import torch
from streamed import batches, flatten, max_difference, train_in_memory, train_streamed, zero_state
from tiny_models import save_tiny_model

from finetune import optim
from finetune.optim.layout import ChunkLayout, chunk_nbytes
from finetune.optim.projection import is_projectable

LR, WEIGHT_DECAY, RANK, GAP, SCALE = 1e-2, 0.1, 8, 7, 0.25


def _reference(named: dict[str, torch.nn.Parameter], layout: ChunkLayout, **galore: float):
    projected = {slot.name for slot in layout.slots if is_projectable(slot)}
    groups = [
        {"params": [p for name, p in named.items() if name not in projected]},
        {"params": [p for name, p in named.items() if name in projected], "proj_type": "std", **galore},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's AdamW announces its own deprecation
        return galore_torch.GaLoreAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, no_deprecation_warning=True)


def test_random_tensors_match_galore_torch_across_refreshes():
    """22 steps with T=7: refreshes at steps 1, 8, 15, 22; both projection sides, a rank above the smaller side."""
    shapes = {
        "tall.weight": torch.Size([48, 24]),  # right projection, (24 -> rank 8)
        "wide.weight": torch.Size([20, 40]),  # left projection
        "narrow.weight": torch.Size([6, 30]),  # rank capped at 6
        "norm.weight": torch.Size([24]),  # 1-D: plain Adam
        "lm_head.weight": torch.Size([50, 24]),  # the head stays full rank
    }
    layout = ChunkLayout.from_shapes(shapes)
    generator = torch.Generator().manual_seed(0)
    initial = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    named = {name: torch.nn.Parameter(t.clone()) for name, t in initial.items()}
    reference = _reference(named, layout, rank=RANK, update_proj_gap=GAP, scale=SCALE)
    ours = optim.GaLore(lr=LR, weight_decay=WEIGHT_DECAY, rank=RANK, update_proj_gap=GAP, scale=SCALE)
    params, state = flatten(initial, layout), zero_state(ours, layout)
    differences = []
    for step in range(1, 23):
        grads = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        for name, p in named.items():
            p.grad = grads[name]
        reference.step()
        ours.step(params, flatten(grads, layout), state, step=step, layout=layout)
        differences.append(max((slot.view(params) - named[slot.name]).abs().max().item() for slot in layout.slots))
    print(f"\nGaLore vs galore_torch, max abs difference over 22 steps: {max(differences):.3g}")
    assert max(differences) <= 1e-6
    moved = (params - flatten(initial, layout)).abs().max().item()
    assert moved > 1e-2, "the update must be large enough for the comparison to mean anything"


def test_state_is_low_rank():
    """A 4096 x 11008 matrix at rank 128: projector 128 x 4096, moments 2 x 11008 x 128, fp32."""
    layout = ChunkLayout.from_shapes({"mlp.down_proj.weight": torch.Size([4096, 11008])})
    specs = optim.GaLore(rank=128).state_specs(layout)
    assert {name: spec.numel for name, spec in specs.items()} == {
        "exp_avg": 11008 * 128,
        "exp_avg_sq": 11008 * 128,
        "projector": 4096 * 128,
    }
    per_param = sum(chunk_nbytes(s.numel, s.dtype) for s in specs.values()) / (4096 * 11008)
    print(f"\nGaLore rank 128 state bytes per parameter, 4096 x 11008: {per_param:.3f}")


def test_streamed_through_nvme_matches_galore_torch(tmp_path):
    """7 steps with T=3 (refreshes at 1, 4, 7), every state chunk through NVMe, against galore-torch in memory."""
    path = save_tiny_model("llama", tmp_path / "model", seed=6, num_hidden_layers=3)
    data = batches(7, seed=23)
    ours = optim.GaLore(lr=LR, weight_decay=WEIGHT_DECAY, rank=4, update_proj_gap=3, scale=SCALE)
    engine = train_streamed(path, ours, data, tmp_path / "swap", tmp_path / "out")
    assert engine.stats()["bytes_written"] > 0

    def reference(model: torch.nn.Module):
        named = dict(model.named_parameters())
        embeddings = optim.embedding_names(model)
        layout = ChunkLayout.from_shapes({n: p.shape for n, p in named.items()}, embeddings)
        return _reference(named, layout, rank=4, update_proj_gap=3, scale=SCALE)

    model, _ = train_in_memory(path, reference, data)
    difference = max_difference(tmp_path / "out", model)
    print(f"\nGaLore streamed vs galore_torch in memory, max abs difference after 7 steps: {difference:.3g}")
    assert difference <= 1e-6
