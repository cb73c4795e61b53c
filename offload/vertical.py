"""The vertical schedule (GreedySnake): with gradient accumulation, each block runs all micro-batches while it is
resident, so its weights, gradients and optimizer state cross each tier once per optimizer step, not once per
micro-batch.

    forward:  for each block: hold it once -> run micro-batch 1, 2, .., k -> release; each decoder layer keeps
              the k inputs it was called with (as activation checkpointing keeps one)
    backward: the head's backward for micro-batch 1 .. k; then for each layer, last first: hold it with its
              gradient chunk -> recompute and back-propagate micro-batch 1 .. k -> release, its update starts
              (the first layer's backward runs on into the embedding's, micro-batch by micro-batch)

Forward: a Hugging Face model's forward runs its layers in a loop of its own, so each micro-batch's forward runs
on a thread of its own and the threads take turns at every block boundary: Note [Micro-batch turns]. Backward is
driven from here: each layer call cut the graph at its output (a fresh leaf that collects the gradient from the
next layer's backward), and each layer's k backward calls run in micro-batch order.

Exact: every parameter's gradient is summed in micro-batch order, as `loss.backward()` per micro-batch sums it,
and each layer's recompute replays the RNG state of its forward. Where that would not hold the schedule is not
used (`vertical_blocker`): a tied embedding (plain PyTorch adds the head's and the embedding's gradient of one
micro-batch before accumulating, and here the head's backward of every micro-batch comes before any embedding's),
active dropout (the micro-batches draw their masks in another order than one forward after another), and
activations kept or offloaded (k micro-batches' activations would be held at once: recompute keeps only inputs).

Memory: every layer keeps the inputs of all k micro-batches until its backward (with one micro-batch at a time,
one), the same bytes as the inputs a single batch of k times the size would keep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .activation_mode import ActivationMode
from .blocks import BlockPlan
from .first_order import Batch, FirstOrderStep
from .recompute import StreamedCheckpoint, backward_through, rng_state, set_rng_state
from .residency import Residency

__all__ = ["VerticalCheckpoint", "VerticalStep", "vertical_blocker"]


def vertical_blocker(model: nn.Module, plan: BlockPlan, activations: ActivationMode) -> str | None:
    """Why the vertical schedule would not be exact for this model (None: it is); see the module docstring."""
    if plan.aliases:
        return "the model ties its input embedding to its output layer"
    if activations is not ActivationMode.RECOMPUTE:
        return f'activations="{activations.value}" keeps every micro-batch\'s activations (it needs "recompute")'
    if _dropout_active(model):
        return "the model has dropout active"
    return None


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _dropout_active(model: nn.Module) -> bool:
    """A dropout module with p > 0, or a config field named like a dropout (`*dropout`, `*pdrop`) above 0 (the
    attention's dropout is often a functional call with the config's probability)."""
    if any(isinstance(m, _DROPOUTS) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    fields = config.to_dict() if config is not None else {}
    return any(isinstance(value, float) and value > 0 and key.endswith(("dropout", "pdrop", "layerdrop"))
               for key, value in fields.items())


# ------------------------------------------------------------------------------------------- micro-batch turns


class MicroBatchTurns:
    """Note [Micro-batch turns]: one thread per micro-batch, of which exactly one runs at a time.

    Every thread stops at each block boundary (a forward pre-hook on each hook point's module, which fires before
    the residency's hold) and hands the turn to the next thread in micro-batch order, round and round; a thread
    that finishes hands it on too. All micro-batches call the same modules in the same order, so when thread j gets
    its turn at boundary n, every thread before it has run the module of boundary n, and every thread after it has
    run boundary n - 1's. So each block runs its micro-batches one after another, and one extra hold (`span`) keeps
    it resident from the first micro-batch's turn at its boundary to the next boundary's first turn.

    The turn is the only ordering: the thread holding it is the only one touching the model, the residency and the
    step's state, and the condition's lock makes each thread's writes visible to the next (happens-before).
    """

    def __init__(self, count: int, hold: Callable[[tuple[int, ...]], None],
                 release: Callable[[tuple[int, ...]], None]) -> None:
        self._hold, self._release = hold, release
        self._turn = threading.Condition()
        self._alive = list(range(count))
        self._running = 0  # the micro-batch whose thread has the turn
        self._micro: dict[int, int] = {}  # thread ident -> micro-batch
        self._boundary: dict[int, int] = {}  # micro-batch -> boundaries passed
        self._span: tuple[int, tuple[int, ...]] | None = None  # (boundary, blocks) held across the micro-batches

    def run(self, bodies: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run `bodies[j]` on micro-batch j's thread, taking turns; their results, or the first one's exception."""
        results: list[Any] = [None] * len(bodies)
        errors: list[BaseException | None] = [None] * len(bodies)
        threads = [threading.Thread(target=self._body, args=(j, body, results, errors), name=f"micro-batch-{j}",
                                    daemon=True) for j, body in enumerate(bodies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for error in errors:
            if error is not None:
                raise error
        return results

    def micro_batch(self) -> int | None:
        """The micro-batch the calling thread runs, or None outside the turns (the caller's own thread)."""
        return self._micro.get(threading.get_ident())

    def at_boundary(self, blocks: tuple[int, ...]) -> None:
        """A micro-batch's forward reaches a block boundary: wait for this thread's turn there."""
        micro = self._micro[threading.get_ident()]
        with self._turn:
            self._boundary[micro] += 1
            self._hand_on(micro)
            self._wait(micro)
            boundary = self._boundary[micro]
            if self._span is None or self._span[0] != boundary:  # the first micro-batch at this boundary
                self._end_span()
                self._span = (boundary, blocks)
                self._hold(blocks)

    def _body(self, micro: int, body: Callable[[], Any], results: list[Any], errors: list[BaseException | None]
              ) -> None:
        self._micro[threading.get_ident()] = micro
        self._boundary[micro] = 0
        try:
            with self._turn:
                self._wait(micro)
            results[micro] = body()
        except BaseException as error:  # re-raised by run() on the caller's thread
            errors[micro] = error
        finally:
            with self._turn:
                self._alive.remove(micro)
                if self._alive:
                    self._running = next((j for j in self._alive if j > micro), self._alive[0])
                else:
                    self._end_span()
                self._turn.notify_all()

    def _hand_on(self, micro: int) -> None:
        """Give the turn to the next micro-batch (under the lock)."""
        self._running = next((j for j in self._alive if j > micro), self._alive[0])
        self._turn.notify_all()

    def _wait(self, micro: int) -> None:
        while self._running != micro:
            self._turn.wait()

    def _end_span(self) -> None:
        if self._span is not None:
            self._release(self._span[1])
            self._span = None


# ------------------------------------------------------------------------------------------------ layer calls


@dataclass(eq=False)
class _LayerCall:
    """One micro-batch's call of one layer in the vertical forward: what its backward recomputes from."""

    function: Callable[..., Any]
    args: list[Any]  # as called: the previous layer's cut output, the embedding's output, masks, positions
    rng: tuple[torch.Tensor, torch.Tensor | None]
    outputs: Any  # the cut outputs: leaves whose .grad the next layer's (or the head's) backward fills

    def backward(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Recompute the layer on its inputs with its forward's RNG state and back-propagate the gradient its
        outputs collected, into the parameters' gradient chunk and the previous layer's cut output. Returns the
        gradients of the inputs that came out of a graph (the first layer's, from the embedding), with them: the
        caller carries them on once the layer is released (both blocks need not be held at once)."""
        args = list(self.args)
        onward = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad and not a.is_leaf]
        for i in onward:
            args[i] = args[i].detach().requires_grad_(True)
        outer_rng = rng_state(device)
        set_rng_state(self.rng, device)
        try:
            with torch.enable_grad():
                outputs = self.function(*args)
        finally:
            set_rng_state(outer_rng, device)
        cut = self.outputs if isinstance(self.outputs, tuple) else (self.outputs,)
        backward_through(outputs, [t.grad if torch.is_tensor(t) else None for t in cut])
        return [(self.args[i], args[i].grad) for i in onward if args[i].grad is not None]


def _cut(output: Any, takes_grad: bool) -> Any:
    """A layer's output with each floating-point tensor made a leaf that takes a gradient (if its inputs did)."""
    def leaf(tensor: Any) -> Any:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and takes_grad:
            return tensor.detach().requires_grad_(True)
        return tensor
    return tuple(leaf(t) for t in output) if isinstance(output, tuple) else leaf(output)


class VerticalCheckpoint:
    """The decoder layers' streamed call in an engine with the vertical schedule, `apply(runner, index, device,
    function, *args)` as `StreamedCheckpoint`'s: inside a vertical forward it runs the layer without a graph and
    keeps its call; otherwise (one micro-batch, or a call outside a step) it is `StreamedCheckpoint`."""

    @staticmethod
    def apply(runner: VerticalStep, index: int, device: torch.device, function: Callable[..., Any], *args: Any
              ) -> Any:
        if runner.turns is None or runner.turns.micro_batch() is None:
            return StreamedCheckpoint.apply(runner, index, device, function, *args)
        return runner.keep_call(index, device, function, args)


# ----------------------------------------------------------------------------------------------------- the step


class VerticalStep(FirstOrderStep):
    """The first-order step with the vertical schedule for more than one micro-batch (one runs as before)."""

    def __init__(self, model: nn.Module, residency: Residency, *args: Any, plan: BlockPlan) -> None:
        super().__init__(model, residency, *args)
        self.turns: MicroBatchTurns | None = None  # set while a vertical forward runs
        self._calls: dict[int, list[_LayerCall | None]] = {}  # layer -> its call per micro-batch, until backward
        self._count = 0  # micro-batches of the step running
        for point in plan.hook_points:  # before the residency's hold: Note [Micro-batch turns]
            point.module.register_forward_pre_hook(partial(self._at_boundary, point.blocks), prepend=True)

    def run_passes(self, micro_batches: list[Batch]) -> list[torch.Tensor]:
        if len(micro_batches) == 1:
            return super().run_passes(micro_batches)
        try:
            losses = self._forward(micro_batches)
            self._backward(losses)
        finally:
            self._calls, self.turns = {}, None
        return losses

    def keep_call(self, index: int, device: torch.device, function: Callable[..., Any], args: tuple[Any, ...]
                  ) -> Any:
        """A layer's call in the vertical forward (on its micro-batch's thread): run it without a graph, keep it."""
        micro = self.turns.micro_batch()  # type: ignore[union-attr]
        rng = rng_state(device)
        with torch.no_grad():
            output = function(*args)
        cut = _cut(output, any(torch.is_tensor(a) and a.requires_grad for a in args))
        calls = self._calls.setdefault(index, [None] * self._count)
        calls[micro] = _LayerCall(function, list(args), rng, cut)
        return cut

    # --------------------------------------------------------------------------------------------- forward

    def _forward(self, micro_batches: list[Batch]) -> list[torch.Tensor]:
        """Every micro-batch's forward, block by block: Note [Micro-batch turns]. Their losses, graphs attached."""
        start = time.perf_counter()
        self._outer.begin()  # once: the k forwards' outer holds all wait for their backward
        self._count = len(micro_batches)
        self.turns = MicroBatchTurns(self._count, self._hold_span, self._release_span)
        device = self.residency.device
        losses = self.turns.run([partial(self._micro_forward, micro, device) for micro in micro_batches])
        self.timers.add("forward", time.perf_counter() - start)
        return losses

    def _micro_forward(self, micro: Batch, device: torch.device) -> torch.Tensor:
        """One micro-batch's forward, on its thread (grad mode and saved-tensor hooks are per thread)."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with torch.enable_grad(), self.residency.saved_weights():
            return self.model(**micro, use_cache=False).loss

    def _at_boundary(self, blocks: tuple[int, ...], module: nn.Module, args: Any) -> None:
        if self.turns is not None and self.turns.micro_batch() is not None:
            self.turns.at_boundary(blocks)

    def _hold_span(self, blocks: tuple[int, ...]) -> None:
        for index in blocks:
            self.residency.hold(index)

    def _release_span(self, blocks: tuple[int, ...]) -> None:
        for index in blocks:
            self.residency.release(index)

    # -------------------------------------------------------------------------------------------- backward

    def _backward(self, losses: list[torch.Tensor]) -> None:
        """The head's backward per micro-batch, then each layer's k backward calls, last layer first, and the
        embedding's per micro-batch after the first layer's.

        The embedding and head blocks' holds (outer_holds.py) run per backward call, and their gradient completes
        in the last micro-batch's call that accumulates into all of their parameters. A block that both ends
        the model and starts it (OPT's final norm is in its embedding's block) has no such call: it completes at
        the end, as after a whole backward."""
        start = time.perf_counter()
        count = len(losses)
        last_calls: list[tuple[int, bool]] = []  # (block, completed) of the blocks the last micro-batch held
        for micro, loss in enumerate(losses):  # stops at the last layer's cut outputs
            self._last_micro = micro == count - 1
            self._outer.begin_backward()
            (loss / count).backward()
            last_calls += self._end_outer_call()
        for index in sorted(self._calls, reverse=True):
            calls = self._calls.pop(index)
            onward = []
            self._last_micro = True  # the layer's one hold: its optimizer state is prefetched, its update follows
            self.begin_layer_backward(index)
            try:
                for micro, call in enumerate(calls):
                    onward.append(call.backward(self.residency.device))  # type: ignore[union-attr]
                    calls[micro] = None  # its inputs and outputs go now
            finally:
                self.end_layer_backward(index)
            for micro, pairs in enumerate(onward):  # the embedding's backward, one micro-batch after another
                if pairs:
                    self._last_micro = micro == count - 1
                    self._outer.begin_backward()
                    torch.autograd.backward([tensor for tensor, _ in pairs], [grad for _, grad in pairs])
                    last_calls += self._end_outer_call()
        self._last_micro = True
        done = {index for index, completed in last_calls if completed}
        for index in dict.fromkeys(index for index, _ in last_calls):
            if index not in done and self.blocks[index].trainable:
                self._outer.complete_now(index)
        self.timers.add("backward", time.perf_counter() - start)

    def _end_outer_call(self) -> list[tuple[int, bool]]:
        """End one backward call's outer holds; on the last micro-batch, (block, completed) of each it held."""
        self._outer.end_backward(complete=False)
        if not self._last_micro:
            return []
        return [(index, self._outer.completed(index)) for index in self._outer.touched()]
