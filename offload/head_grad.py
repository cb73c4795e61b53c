"""The output layer's weight gradient computed straight into its held gradient chunk, not into a temporary.

Autograd computes a trained head's weight gradient as a new vocab x hidden tensor and then adds it into `.grad`
(the chunk): 0.5 GB beside the budget for a 7B Llama, 2 GB for a 128k vocabulary, more than everything else a
full fine-tuning step holds outside it at short sequences. The engine's head leaves the input gradient to
autograd (the weight is given to `F.linear` detached, so autograd computes no weight gradient) and has a small
Function on the output write the weight gradient with `torch.mm(..., out=chunk)`.

Bit for bit the same: `F.linear` on a 3-D input without bias is `matmul`, which folds the tokens into one
dimension and calls `mm(input, weight.t())`; for the column-major `weight.t()` autograd's mm backward computes
the weight's gradient as `mm(grad.t(), input)` (a contiguous vocab x hidden result), and accumulation adds that
into `.grad`, zeros at a step's start. Here the same `mm` is written into the zeroed chunk (x + 0 = x). The
Function then hands autograd an all-zero gradient of no memory (an expanded scalar) for the parameter, so that
its accumulation (a no-op add) still fires the post-accumulate hooks the outer holds wait for
(outer_holds.py). Only where that holds: a plain `nn.Linear` without bias, its weight its own Parameter, one
micro-batch a step (later micro-batches add into a chunk that is no longer zero), fp32 on the CPU (CUDA keeps
autograd's path: its mm kernels are not promised to match with `out=`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .embedding_grad import add_rows_into_grad, shared_parameters

__all__ = ["outer_gradients_into_chunks", "takes_direct_gradient"]


class _WeightGradientIntoChunk(torch.autograd.Function):
    """Identity on the head's output; its backward writes the weight gradient into `parameter.grad`."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, inputs: torch.Tensor, parameter: nn.Parameter) -> torch.Tensor:
        ctx.parameter = parameter
        ctx.save_for_backward(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (inputs,) = ctx.saved_tensors
        target = ctx.parameter.grad
        if target is None:
            raise RuntimeError("the head's gradient chunk is not held at its backward; this is a bug")
        torch.mm(grad.reshape(-1, grad.shape[-1]).t(), inputs.reshape(-1, inputs.shape[-1]), out=target)
        return grad, None, torch.zeros((), dtype=target.dtype, device=target.device).expand(target.shape)


def _forward(self: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return F.linear(inputs, self.weight)
    output = F.linear(inputs, self.weight.detach())  # autograd makes the input's gradient only
    return _WeightGradientIntoChunk.apply(output, inputs.detach(), self.weight)


def takes_direct_gradient(
    module: nn.Module, shared: set[int], device: torch.device, accumulation_steps: int, dtype: torch.dtype
) -> bool:
    """Whether `module` is a head whose weight gradient goes straight into its chunk (see the module note)."""
    return (type(module) is nn.Linear and module.bias is None and module.weight.requires_grad
            and id(module.weight) not in shared and device.type == "cpu" and accumulation_steps == 1
            and dtype == torch.float32)


def outer_gradients_into_chunks(
    modules: list[nn.Module], model: nn.Module, device: torch.device, accumulation_steps: int, dtype: torch.dtype
) -> None:
    """The outer `modules` of `model` that can, write their weight gradients into their chunks: the embedding
    row by row (embedding_grad.py), the head by `takes_direct_gradient`."""
    shared = shared_parameters(model)
    add_rows_into_grad(modules, shared, device)
    for module in modules:
        if takes_direct_gradient(module, shared, device, accumulation_steps, dtype):
            module.forward = types.MethodType(_forward, module)
