"""Streamed layer calls, with or without activation recompute: a layer's weights need only be resident while it
runs forward and while it runs backward.

Two ways to bridge the gap between a layer's forward and its backward:

- `StreamedCheckpoint` (activation checkpointing): forward runs without building a graph and keeps only the
  layer's inputs; backward recomputes the layer with the same RNG state, then back-propagates through it.
  Activation memory is one layer's worth; the price is a second forward of every layer.
- `StreamedLayer`: forward builds the layer's graph and keeps it, as plain PyTorch does; backward only
  back-propagates. No recompute, but every layer's activations stay in memory until its backward.

Either way, backward first makes the layer's block resident again (the engine prefetched it) with its gradient
chunk, parameter gradients accumulate into views of that chunk, and the engine is then told the block is
finished, the moment its optimizer step can start (Fuyou's overlap). A kept graph must not hold on to the
weights' buffers (the block is evicted in between): `runner.saved_weights` swaps any saved view of a weight
chunk for a reference that is resolved against the block's buffer at backward time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = ["LayerRunner", "StreamedCheckpoint", "StreamedLayer"]


class LayerRunner(Protocol):
    """What a streamed layer call needs from the engine."""

    def begin_layer_backward(self, index: int) -> None: ...

    def end_layer_backward(self, index: int) -> None: ...

    def saved_weights(self) -> torch.autograd.graph.saved_tensors_hooks: ...


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def detached_inputs(ctx: Any, args: Sequence[Any], tensors: Sequence[torch.Tensor]) -> list[Any]:
    """`args` with each tensor replaced by a detached leaf (requiring grad as before); the leaves go in ctx.inputs."""
    ctx.inputs = [tensor.detach().requires_grad_(tensor.requires_grad) for tensor in tensors]
    call_args = list(args)
    for position, tensor in zip(ctx.tensor_positions, ctx.inputs):
        call_args[position] = tensor
    return call_args


def backward_through(outputs: Any, grad_outputs: Sequence[torch.Tensor | None]) -> None:
    """Back-propagate `grad_outputs` through a layer call's kept `outputs` (here and in activations.py)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [
        (output, grad)
        for output, grad in zip(outputs, grad_outputs)
        if torch.is_tensor(output) and output.requires_grad and grad is not None
    ]
    # Parameter .grad tensors are views into the block's gradient chunk: autograd adds into them in place.
    torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])


def input_grads(ctx: Any, nargs: int) -> tuple[torch.Tensor | None, ...]:
    """What a streamed call's backward returns: None for (runner, index, device, function), then each input's grad."""
    grads: list[torch.Tensor | None] = [None] * nargs
    for position, tensor in zip(ctx.tensor_positions, ctx.inputs):
        grads[position] = tensor.grad if tensor.requires_grad else None
    return (None, None, None, None, *grads)


def remember_call(
    ctx: Any, runner: LayerRunner, index: int, device: torch.device, function: Callable, args: Sequence[Any]
) -> None:
    """Keep in `ctx` what a streamed call's backward needs of its call, its tensor arguments apart."""
    ctx.runner, ctx.index, ctx.device, ctx.function = runner, index, device, function
    ctx.tensor_positions = [i for i, arg in enumerate(args) if torch.is_tensor(arg)]
    ctx.args = [None if torch.is_tensor(arg) else arg for arg in args]


class StreamedCheckpoint(torch.autograd.Function):
    """A checkpointed layer call: `apply(runner, index, device, function, *args)`."""

    @staticmethod
    def forward(
        ctx: Any, runner: LayerRunner, index: int, device: torch.device, function: Callable[..., Any], *args: Any
    ) -> Any:
        remember_call(ctx, runner, index, device, function, args)
        ctx.rng = rng_state(device)  # replayed in backward so dropout masks match the forward
        ctx.save_for_backward(*[arg for arg in args if torch.is_tensor(arg)])
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ctx.runner.begin_layer_backward(ctx.index)
        try:
            args = detached_inputs(ctx, ctx.args, ctx.saved_tensors)
            outer_rng = rng_state(ctx.device)
            set_rng_state(ctx.rng, ctx.device)
            with torch.enable_grad():
                outputs = ctx.function(*args)
            set_rng_state(outer_rng, ctx.device)
            backward_through(outputs, grad_outputs)
        finally:
            ctx.runner.end_layer_backward(ctx.index)
        return input_grads(ctx, len(ctx.args))


class StreamedLayer(torch.autograd.Function):
    """A layer call that keeps its graph (no recompute): `apply(runner, index, device, function, *args)`."""

    @staticmethod
    def forward(
        ctx: Any, runner: LayerRunner, index: int, device: torch.device, function: Callable[..., Any], *args: Any
    ) -> Any:
        remember_call(ctx, runner, index, device, function, args)
        call_args = detached_inputs(ctx, args, [arg for arg in args if torch.is_tensor(arg)])
        with torch.enable_grad(), runner.saved_weights():
            ctx.outputs = function(*call_args)  # the layer's own graph, kept until backward
        if isinstance(ctx.outputs, tuple):
            return tuple(t.detach() if torch.is_tensor(t) else t for t in ctx.outputs)
        return ctx.outputs.detach()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ctx.runner.begin_layer_backward(ctx.index)
        try:
            backward_through(ctx.outputs, grad_outputs)
        finally:
            ctx.outputs = None  # frees the graph's activations now, not when autograd drops ctx
            ctx.runner.end_layer_backward(ctx.index)
        return input_grads(ctx, len(ctx.args))
