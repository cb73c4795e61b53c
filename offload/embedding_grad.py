"""The embedding's gradient added into its held gradient chunk row by row, not through a dense temporary.

Autograd's embedding backward builds a zero vocab x hidden gradient, adds each token's row into it, and hands
that to the parameter's accumulation, which adds it into `.grad` (the chunk). The temporary is the size of the
whole embedding and sits outside the budget: 0.5 GB for a 7B Llama, 2 GB for a 128k vocabulary. Only the rows
of the batch's tokens are non-zero, so the engine's embedding computes those rows into a small tensor and adds
them into the chunk directly.

Bit for bit the same: autograd sums the rows of one token id in the order of the tokens, starting from zero,
then adds that sum into `.grad`; here the rows are summed in the same order into zeros (`index_add_` on the CPU
walks the index in order) and each sum is added once into `.grad`. Rows of ids not in the batch get nothing
added, where autograd adds a zero. Only where that holds: a plain `nn.Embedding` (no max_norm, frequency
scaling or sparse gradients; a subclass may change the forward), whose weight is its own Parameter (a tied
weight kept as one Parameter under accumulation sums both uses' gradients before adding them, so it keeps
autograd's path), on the CPU (on CUDA `index_add_` adds with atomics, in no fixed order).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["add_rows_into_grad", "shared_parameters", "takes_row_gradient"]


class _EmbeddingRows(torch.autograd.Function):
    """F.embedding whose backward adds the gradient rows into `parameter.grad`, returning none for the weight."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, parameter: nn.Parameter,
                padding_idx: int | None) -> torch.Tensor:
        ctx.parameter, ctx.padding_idx, ctx.hidden = parameter, padding_idx, weight.shape[1]
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        (ids,) = ctx.saved_tensors
        target = ctx.parameter.grad
        if target is None:
            raise RuntimeError("the embedding's gradient chunk is not held at its backward; this is a bug")
        ids, grad = ids.reshape(-1), grad.reshape(-1, ctx.hidden)
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        rows, position = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(rows), ctx.hidden, dtype=grad.dtype, device=grad.device)
        sums.index_add_(0, position, grad)  # each id's rows in token order, from zero, as autograd sums them
        target.index_add_(0, rows, sums)
        return None, None, None, None


def _forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return F.embedding(ids, self.weight, self.padding_idx)
    weight = self.weight.detach()  # the held chunk's view; autograd does not see it as the parameter
    return _EmbeddingRows.apply(ids, weight, self.weight, self.padding_idx)


def shared_parameters(model: nn.Module) -> set[int]:
    """id() of the Parameter objects more than one module holds (a tied weight kept as one object)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def takes_row_gradient(module: nn.Module, shared: set[int], device: torch.device) -> bool:
    """Whether `module` gets the row-wise backward: where it is exact (see the module note)."""
    plain = type(module) is nn.Embedding and module.max_norm is None
    return (plain and not module.scale_grad_by_freq and not module.sparse and id(module.weight) not in shared
            and device.type == "cpu")


def add_rows_into_grad(modules: list[nn.Module], shared: set[int], device: torch.device) -> None:
    """Give each module of `modules` that `takes_row_gradient` the row-wise backward."""
    for module in modules:
        if takes_row_gradient(module, shared, device):
            module.forward = types.MethodType(_forward, module)
