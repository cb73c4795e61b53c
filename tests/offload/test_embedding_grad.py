"""The embedding's row-wise backward (embedding_grad.py) against autograd's dense one, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.offload.embedding_grad import add_rows_into_grad, shared_parameters, takes_row_gradient


def _pair(vocab: int, hidden: int, padding_idx: int | None) -> tuple[nn.Embedding, nn.Embedding]:
    reference = nn.Embedding(vocab, hidden, padding_idx=padding_idx)
    rows = nn.Embedding(vocab, hidden, padding_idx=padding_idx)
    rows.load_state_dict(reference.state_dict())
    add_rows_into_grad([rows], set(), torch.device("cpu"))
    return reference, rows


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_rows_added_into_the_gradient_equal_autograd_to_the_bit(padding_idx):
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    reference, rows = _pair(50, 24, padding_idx)
    rows.weight.grad = chunk = torch.zeros_like(rows.weight)  # the engine's held gradient chunk, zero at first
    for _ in range(3):  # accumulation: the second and third add into a non-zero gradient
        ids = torch.randint(0, 10, (4, 33), generator=generator)  # few ids: many repeats, in varied order
        upstream = torch.randn(4, 33, 24, generator=generator)
        for module in (reference, rows):
            (module(ids) * upstream).sum().backward()
    assert rows.weight.grad is chunk  # added into in place, never replaced
    assert torch.equal(rows.weight.grad, reference.weight.grad)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[:10] = False
    assert torch.equal(rows.weight.grad[untouched], torch.zeros_like(rows.weight.grad[untouched]))


def test_the_dense_backward_is_gone_from_the_graph():
    reference, rows = _pair(50, 8, None)
    rows.weight.grad = torch.zeros_like(rows.weight)
    ids = torch.randint(0, 50, (2, 5))
    assert "Embedding" in type(reference(ids).grad_fn).__name__
    assert type(rows(ids).grad_fn).__name__ == "_EmbeddingRowsBackward"
    with torch.no_grad():
        assert torch.equal(rows(ids), reference(ids))


def test_only_where_it_is_exact():
    cpu = torch.device("cpu")
    plain = nn.Embedding(10, 4)
    assert takes_row_gradient(plain, set(), cpu)
    assert not takes_row_gradient(plain, {id(plain.weight)}, cpu)  # a tied weight kept as one Parameter
    assert not takes_row_gradient(plain, set(), torch.device("cuda"))
    assert not takes_row_gradient(nn.Embedding(10, 4, max_norm=1.0), set(), cpu)
    assert not takes_row_gradient(nn.Embedding(10, 4, scale_grad_by_freq=True), set(), cpu)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    assert not takes_row_gradient(Scaled(10, 4), set(), cpu)
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert shared_parameters(tied) == {id(tied[0].weight)}
