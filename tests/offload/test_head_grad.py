"""The head's weight gradient written into its chunk (head_grad.py) against autograd's, bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from finetune.offload.head_grad import outer_gradients_into_chunks, takes_direct_gradient

CPU = torch.device("cpu")


def test_the_head_gradient_written_into_the_chunk_equals_autograd_to_the_bit():
    """Fresh random shapes and values; the input's gradient and the post-accumulate hook as autograd gives them."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    vocab, hidden, rows, seq = (int(torch.randint(low, high, (), generator=generator))
                                for low, high in ((300, 700), (40, 130), (1, 4), (5, 40)))
    reference, direct = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    direct.load_state_dict(reference.state_dict())
    outer_gradients_into_chunks([direct], direct, CPU, 1, torch.float32)
    accumulated: list[nn.Parameter] = []
    direct.weight.register_post_accumulate_grad_hook(accumulated.append)
    direct.weight.grad = chunk = torch.zeros_like(direct.weight)  # the engine's held gradient chunk, zero at first
    inputs = torch.randn(rows, seq, hidden, generator=generator)
    upstream = torch.randn(rows, seq, vocab, generator=generator)
    gradients = []
    for module in (reference, direct):
        x = inputs.clone().requires_grad_()
        output = module(x)
        (output * upstream).sum().backward()
        gradients.append((output.detach(), x.grad))
    assert type(direct(inputs.requires_grad_()).grad_fn).__name__ == "_WeightGradientIntoChunkBackward"
    assert direct.weight.grad is chunk and accumulated == [direct.weight]  # into the chunk; the hook fired
    assert torch.equal(chunk, reference.weight.grad)
    assert torch.equal(gradients[0][0], gradients[1][0]) and torch.equal(gradients[0][1], gradients[1][1])


def test_only_where_it_is_exact():
    head = nn.Linear(8, 20, bias=False)
    assert takes_direct_gradient(head, set(), CPU, 1, torch.float32)
    assert not takes_direct_gradient(head, set(), CPU, 2, torch.float32)  # later micro-batches add into it
    assert not takes_direct_gradient(head, {id(head.weight)}, CPU, 1, torch.float32)  # a tied weight as one object
    assert not takes_direct_gradient(head, set(), torch.device("cuda"), 1, torch.float32)
    assert not takes_direct_gradient(head, set(), CPU, 1, torch.bfloat16)
    assert not takes_direct_gradient(nn.Linear(8, 20), set(), CPU, 1, torch.float32)  # a bias
    head.weight.requires_grad_(False)
    assert not takes_direct_gradient(head, set(), CPU, 1, torch.float32)  # frozen (LoRA): nothing to write
