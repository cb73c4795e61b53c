"""Activation checkpointing that also streams: a layer's weights need only be resident while it runs.

Forward runs the layer without building a graph and keeps only its inputs. Backward makes the layer's block
resident (the engine prefetched it), recomputes the layer with the same RNG state, back-propagates through it
(parameter gradients accumulate into views of the block's gradient chunk) and then tells the engine the block
is finished, which is the moment its optimizer step can start (Fuyou's overlap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

__all__ = ["LayerRunner", "StreamedCheckpoint"]


class LayerRunner(Protocol):
    """What the checkpoint needs from the engine around one layer's backward."""

    def begin_layer_backward(self, index: int) -> None: ...

    def end_layer_backward(self, index: int) -> None: ...


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class StreamedCheckpoint(torch.autograd.Function):
    """A checkpointed layer call: `apply(runner, index, device, function, *args)`."""

    @staticmethod
    def forward(
        ctx: Any,
        runner: LayerRunner,
        index: int,
        device: torch.device,
        function: Callable[..., Any],
        *args: Any,
    ) -> Any:
        ctx.runner, ctx.index, ctx.device, ctx.function = runner, index, device, function
        ctx.rng = _rng_state(device)  # replayed in backward so dropout masks match the forward
        ctx.tensor_positions = [i for i, arg in enumerate(args) if torch.is_tensor(arg)]
        ctx.args = [None if torch.is_tensor(arg) else arg for arg in args]
        ctx.save_for_backward(*[arg for arg in args if torch.is_tensor(arg)])
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ctx.runner.begin_layer_backward(ctx.index)
        try:
            inputs = [tensor.detach().requires_grad_(tensor.requires_grad) for tensor in ctx.saved_tensors]
            args = list(ctx.args)
            for position, tensor in zip(ctx.tensor_positions, inputs):
                args[position] = tensor
            outer_rng = _rng_state(ctx.device)
            _set_rng_state(ctx.rng, ctx.device)
            with torch.enable_grad():
                outputs = ctx.function(*args)
            _set_rng_state(outer_rng, ctx.device)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [
                (output, grad)
                for output, grad in zip(outputs, grad_outputs)
                if torch.is_tensor(output) and output.requires_grad and grad is not None
            ]
            # Parameter .grad tensors are views into the block's gradient chunk: autograd adds into them in place.
            torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        finally:
            ctx.runner.end_layer_backward(ctx.index)
        grads: list[torch.Tensor | None] = [None] * len(ctx.args)
        for position, tensor in zip(ctx.tensor_positions, inputs):
            grads[position] = tensor.grad if tensor.requires_grad else None
        return (None, None, None, None, *grads)
