"""The embedding and head blocks in backward: held from when their module's output gradient is ready until that
module's backward is done, not to the end of the whole backward.

Decoder layers are streamed calls that run their own backward and tell the step when it starts and ends
(recompute.py). The embedding and head run under ordinary autograd, so nothing says when their backward is over.
Two autograd signals together do: the gradient of every input of the module that takes one is computed (a hook
on each input tensor: every product on the way from input to output has run, and used the weights), and each of
the module's trainable parameters has had its gradient accumulated into the held gradient chunk (a
post-accumulate-grad hook: until then the chunk must stay bound, or autograd would put the gradient in a new
tensor). Autograd does not promise the order of the two, so a hold ends when both have happened.

Why it matters: the head, held to the end of backward, shared the device tier with every layer's backward, and
with the embedding, so the device floor was the largest layer plus both of them (for a 7B Llama, 1.6 GB of layer
and 2.1 GB of embedding and head, gradients included). Released after its own backward, the head is gone before
the last layer needs the room; the floor is the largest single block.

A block's gradient is complete, and its update may start, when no hold of it is active and every parameter that
views it has accumulated: a tied embedding's head twin accumulates first, the embedding last, so that block
completes at the very end. Whatever is incomplete when backward ends completes then (`end_backward`), as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .residency import Residency, tensors_of

__all__ = ["OuterHolds"]


@dataclass
class _Hold:
    """One outer module's call in forward, and what its backward has done so far."""

    blocks: tuple[int, ...]
    waiting: set[int]  # id() of the module's trainable parameters, to be accumulated before the hold may end
    inputs: int  # inputs that take a gradient, not computed yet
    held: bool = False


def _weakly(method: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """`method` as a parameter hook that does not keep its object alive. torch keeps a parameter's post-accumulate
    hooks on its C++ side, out of the garbage collector's sight, so a hook holding these holds made the cycle
    parameter -> hook -> holds -> residency -> model -> parameter one that was never collected: each closed engine
    kept its whole budget resident (0.9 GiB a row in stream_overhead's process)."""
    reference = weakref.WeakMethod(method)

    def hook(parameter: torch.Tensor) -> None:
        bound = reference()
        if bound is not None:
            bound(parameter)

    return hook


class OuterHolds:
    """Holds of the embedding and head blocks through their own backward. Compute thread only: autograd runs
    tensor and accumulate hooks on the thread that called backward.

    Args:
        residency: holds and releases the blocks.
        complete: called with a trainable block's index, while it is held with its gradient chunk, once its
            gradient for this backward is complete (no more accumulation will come into it).
        released: called with that index after its last hold was released: its update may start.
    """

    def __init__(self, residency: Residency, complete: Callable[[int], None], released: Callable[[int], None]) -> None:
        self.residency, self.blocks = residency, residency.blocks
        self.on_complete, self.on_released = complete, released
        self._holds: list[_Hold] = []
        self._accumulated: set[int] = set()  # id() of parameters whose gradient accumulated in this backward
        self._hooked: set[int] = set()  # id() of parameters with our post-accumulate hook
        self._hooks: list[RemovableHandle] = []  # those hooks, removed by `close`
        self._active: dict[int, int] = {}  # block -> holds of it active now
        self._touched: dict[int, None] = {}  # blocks held in this backward, in order
        self._complete: set[int] = set()

    def begin(self) -> None:
        """A micro-batch's forward starts (the vertical schedule's: all of them): forget the last step's holds."""
        self._holds = []
        self.begin_backward()

    def begin_backward(self) -> None:
        """A backward call starts: forget what the last one accumulated and completed. The holds tracked in forward
        stay: the vertical schedule runs a backward call per micro-batch and layer, each of which ends some of them."""
        self._accumulated, self._active, self._touched, self._complete = set(), {}, {}, set()

    def track(self, blocks: tuple[int, ...], module: nn.Module, args: Any, output: torch.Tensor) -> None:
        """Forward, after an outer module that produced `output` (which takes a gradient): hook its backward."""
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if id(p) not in self._hooked:
                self._hooks.append(p.register_post_accumulate_grad_hook(_weakly(self._accumulate)))
                self._hooked.add(id(p))
        inputs = [t for t in tensors_of(args) if t.requires_grad]
        hold = _Hold(blocks, {id(p) for p in params}, len(inputs))
        self._holds.append(hold)
        output.register_hook(partial(self._output_gradient, hold))
        for tensor in inputs:
            tensor.register_hook(partial(self._input_gradient, hold))

    def close(self) -> None:
        """Remove the parameters' hooks (an engine dropped unclosed is collected too: `_weakly`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._hooked = [], set()

    def end_backward(self, *, complete: bool = True) -> None:
        """A backward call is over. End the holds still active; with `complete` (the backward's last call) every
        gradient is complete then, so also complete the blocks that were released before all their parameters had
        accumulated (held again for that). Holds whose backward has not come stay for a later call (the vertical
        schedule's), until `begin`."""
        for hold in [hold for hold in self._holds if hold.held]:
            self._release(hold, at_end=complete)
        if complete:
            for index in [i for i in self._touched if i not in self._complete and self.blocks[i].trainable]:
                self.complete_now(index)

    def touched(self) -> list[int]:
        """The blocks held since `begin_backward`, and which of them completed: for a caller that completes
        blocks across several backward calls."""
        return list(self._touched)

    def completed(self, index: int) -> bool:
        return index in self._complete

    def complete_now(self, index: int) -> None:
        """Complete trainable block `index`, released while some of what views it was still to accumulate (held
        again for that)."""
        self.residency.hold(index, grads=True)
        self._complete.add(index)
        self.on_complete(index)
        self.residency.release(index, grads=True)
        self.on_released(index)

    # --------------------------------------------------------------------------------------- autograd hooks

    def _output_gradient(self, hold: _Hold, grad: torch.Tensor) -> None:
        """The module's backward is about to run: hold its blocks with their gradient chunks."""
        for index in hold.blocks:
            self.residency.hold(index, grads=self.blocks[index].trainable)
            self._active[index] = self._active.get(index, 0) + 1
            self._touched[index] = None
        hold.held = True

    def _input_gradient(self, hold: _Hold, grad: torch.Tensor) -> None:
        hold.inputs -= 1
        self._release_if_done(hold)

    def _accumulate(self, parameter: torch.Tensor) -> None:
        self._accumulated.add(id(parameter))
        for hold in [hold for hold in self._holds if id(parameter) in hold.waiting]:
            self._release_if_done(hold)

    # ------------------------------------------------------------------------------------------- releases

    def _release_if_done(self, hold: _Hold) -> None:
        if hold.held and hold.inputs <= 0 and hold.waiting <= self._accumulated:
            self._release(hold, at_end=False)

    def _release(self, hold: _Hold, *, at_end: bool) -> None:
        """End `hold`; a block whose last active hold this was completes when all that views it has accumulated."""
        hold.held = False
        self._holds.remove(hold)
        for index in hold.blocks:
            trainable = self.blocks[index].trainable
            self._active[index] -= 1
            completes = (
                trainable and self._active[index] == 0 and index not in self._complete
                and (at_end or all(id(p) in self._accumulated for p, _ in self.blocks[index].bound()))
            )
            if completes:
                self._complete.add(index)
                self.on_complete(index)  # still held: the gradient chunk is bound
            self.residency.release(index, grads=trainable)
            if completes:
                self.on_released(index)
