"""Chunk-wise AdamW against torch.optim.AdamW on fresh random tensors: equal to the bit (same op order)."""

from __future__ import annotations

import pytest
import torch

from finetune import optim
from finetune.optim.layout import ChunkLayout


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_flat_chunk_update_equals_torch_adamw(weight_decay):
    # "d" makes the block span several update slices (2**18 elements each), with an odd tail.
    shapes = {
        "a": torch.Size([7, 5]), "b": torch.Size([300]), "c": torch.Size([2, 3, 4]), "d": torch.Size([1031, 1033])
    }
    layout = ChunkLayout.from_shapes(shapes)
    params = {name: torch.randn(shape) for name, shape in shapes.items()}
    reference = [torch.nn.Parameter(p.clone()) for p in params.values()]
    torch_adamw = torch.optim.AdamW(reference, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    ours = optim.AdamW(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    flat = torch.zeros(layout.numel)
    for view, p in zip(layout.views(flat), params.values()):
        view.copy_(p)
    state = {name: torch.zeros(spec.numel, dtype=spec.dtype) for name, spec in ours.state_specs(layout).items()}
    for step in range(1, 8):
        grads = [torch.randn(shape) for shape in shapes.values()]
        for p, g in zip(reference, grads):
            p.grad = g
        torch_adamw.step()
        flat_grads = torch.zeros(layout.numel)
        for view, g in zip(layout.views(flat_grads), grads):
            view.copy_(g)
        ours.step(flat, flat_grads, state, step=step, layout=layout)
    for view, p in zip(layout.views(flat), reference):
        assert torch.equal(view, p.detach())
    padding = torch.ones(layout.numel, dtype=torch.bool)
    for slot in layout.slots:
        padding[slot.offset : slot.offset + slot.numel] = False
    assert not flat[padding].any(), "padding between tensors must stay zero"


def test_bad_hyperparameters_are_reported_together():
    with pytest.raises(ValueError, match="lr=-1.*betas=.*weight_decay=-0.1"):
        optim.AdamW(lr=-1, betas=(0.9, 1.0), weight_decay=-0.1)
