"""Streamed MeZO, the ZO2 way: each block's weights are read and written once per step.

MeZO needs two forward passes per sample (weights theta + eps*z, then theta - eps*z). Streaming them one after
the other would read every block twice. Instead the batch is repeated once per perturbed pass and the model runs
one forward over all of them. As each block is resident, its module runs once per pass, each time with that
pass's perturbed weights, on that pass's rows:

    before the module (forward pre-hook): apply the previous step's update to the block (lazily, ZO2), set the
        weights of pass 0, and hand the module only pass 0's rows
    after it (forward hook): run the module's forward again for every other pass with its weights, put theta
        back, and return the passes' outputs concatenated in pass order

Note [Perturbed one module at a time]: a decoder layer's perturbed weights, with z beside them, are two copies of
the layer in fp32 outside the budget (2.5 GB for a 13B Llama). Each module inside a hooked one that owns
parameters (a Linear, a norm) is hooked too: just before it runs in a perturbed pass its weights are drawn
perturbed, z generated from its seed into the buffer that becomes theta +- eps*z, and just after it they are
theta again. So one module's weights are perturbed at a time, z is never kept, and it is drawn once per pass
rather than once per sample (plus once for the update). The hooked module's own parameters (an embedding, the
head) are perturbed around its passes in the same way.

The previous step's update needs that step's projected gradients, known only once its forward has finished; it
is applied when the block is next loaded, so the weights are read once (update, then perturb) and written once.
`flush` applies a pending update to every block, for when the weights are read outside a step (eval, export,
checkpoint). A block the modules at both ends of the model use (a tied embedding and head) is held through the
step, so it is read and updated once; the embedding and head blocks of an untied model are held only while
their module runs, like the layers.

Weights stored in bf16 (`MeZO.storage_dtype`) are upcast to fp32 while a block is held (residency.py's
Note [Compute copies]): the passes perturb and run in fp32, and the update reads the chunk, computes in fp32 and
writes it back rounded stochastically (optim/rounding.py), then refreshes the held copy.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from torch import nn

from ..optim.mezo import MeZO
from .blocks import BlockPlan
from .chunks import Tier
from .residency import Residency
from .timers import Timers

__all__ = ["ZerothOrderStep"]


class ZerothOrderStep:
    """The zeroth-order step of an engine whose optimizer is `optim.MeZO`. Compute thread only."""

    def __init__(self, model: nn.Module, residency: Residency, optimizer: MeZO, timers: Timers,
                 plan: BlockPlan) -> None:
        self.model, self.residency, self.optimizer, self.timers = model, residency, optimizer, timers
        self.blocks = residency.blocks
        before, after = plan.outer_sides()
        self.held_through = [i for i in before if i in after]  # blocks both ends of the model use
        self.pending: tuple[int, list[float]] | None = None  # (step, g per sample) not yet applied to weights
        self._step = 0  # the step whose forward runs
        self._passes = 0  # perturbed passes (2 x samples) while a step's forward runs, else 0
        self._rows = 0  # rows of the batch, per pass
        self._fresh: set[int] = set()  # blocks brought up to date in this step
        self._call: tuple[tuple, dict] | None = None  # the arguments of the module running
        self._pass: int | None = None  # the perturbed pass that module runs

    def install(self, module: nn.Module, blocks: tuple[int, ...]) -> None:
        """Hook `module`, after the engine's hook that holds its blocks and before the one that releases them, and
        each module inside it that owns parameters: Note [Perturbed one module at a time]."""
        module.register_forward_pre_hook(partial(self._before, blocks), with_kwargs=True)
        module.register_forward_hook(partial(self._after, blocks), with_kwargs=True, prepend=True)
        for inner in module.modules():
            if inner is not module and _own_parameters(inner):
                inner.register_forward_pre_hook(self._before_inner)
                inner.register_forward_hook(self._after_inner)

    # ----------------------------------------------------------------------------------------- the step

    def step(self, batch: dict[str, torch.Tensor], step: int) -> float:
        """MeZO step `step`; returns the mean loss over all perturbed passes."""
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("MeZO needs `labels` in the batch: it measures the loss, there is no backward")
        self._passes, self._rows, self._step = 2 * self.optimizer.samples, len(labels), step
        inputs = {k: v.repeat(self._passes, *[1] * (v.dim() - 1)) for k, v in batch.items() if k != "labels"}
        self._fresh = set()
        outer = self.held_through
        self.model.eval()  # MeZO measures the loss without dropout, as its reference does
        try:
            for index in outer:
                self.residency.hold(index)
            with torch.no_grad():
                logits = self.model(**inputs, use_cache=False).logits
            for index in range(len(self.blocks)):
                self._bring_up_to_date(index)  # a block no module used this step still takes the update
        finally:
            for index in outer:
                self.residency.release(index)
            self._passes = 0
        rows, vocab = self._rows, self.model.config.vocab_size
        losses = [
            self.model.loss_function(logits=logits[k * rows : (k + 1) * rows], labels=labels, vocab_size=vocab)
            for k in range(2 * self.optimizer.samples)
        ]
        samples = range(self.optimizer.samples)
        gradients = [self.optimizer.projected_gradient(losses[2 * i], losses[2 * i + 1]) for i in samples]
        self.pending = (step, gradients)
        return float(torch.stack(losses).mean())  # host sync: the loss value

    def flush(self) -> None:
        """Apply the pending update to every block now."""
        if self.pending is None:
            return
        for state in self.blocks:
            with self.residency.in_host(state.weights, dirty=True) as flat:
                for slot in state.layout.slots:
                    self.optimizer.update(slot.view(flat), slot.name, *self.pending)
        self.pending = None

    def discard_pending(self) -> None:
        """Forget the pending update: the weights are replaced (a checkpoint is loaded)."""
        self.pending = None

    def _bring_up_to_date(self, index: int) -> None:
        """Apply the previous step's update to block `index` once, the first time this step touches it."""
        if index in self._fresh:
            return
        self._fresh.add(index)
        if self.pending is None:
            return
        state, store = self.blocks[index], self.residency.store
        flat = store.acquire(state.weights, Tier.DEVICE)
        start = time.perf_counter()
        for slot in state.layout.slots:
            self.optimizer.update(slot.view(flat), slot.name, *self.pending)
        self.timers.add("optimizer math", time.perf_counter() - start)
        self.residency.refresh(index)  # a held block's fp32 copy of bf16-stored weights: Note [Compute copies]
        store.release(state.weights, Tier.DEVICE, dirty=True)

    # -------------------------------------------------------------------------------------- the hooks

    def _before(self, blocks: tuple[int, ...], module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self._passes:
            return None
        if self._call is not None:
            raise NotImplementedError(f"{type(module).__name__} runs inside another streamed module; MeZO streaming "
                                      "needs the modules that own weights to be disjoint")
        for index in blocks:
            self._bring_up_to_date(index)
        self._call, self._pass = (args, kwargs), 0
        self._perturb(_own_parameters(module))
        return self._rows_of(args, 0), self._rows_of(kwargs, 0)

    def _after(self, blocks: tuple[int, ...], module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._passes:
            return None
        full_args, full_kwargs = self._call
        outputs = [output]
        try:
            for pass_index in range(1, self._passes):
                self._pass = pass_index
                self._perturb(_own_parameters(module))
                rows_args, rows_kwargs = self._rows_of(full_args, pass_index), self._rows_of(full_kwargs, pass_index)
                outputs.append(module.forward(*rows_args, **rows_kwargs))  # the inner modules' hooks perturb them
        finally:
            self._restore(_own_parameters(module))
            self._call = self._pass = None
        return _concatenate(outputs, self._rows)

    def _before_inner(self, module: nn.Module, args: tuple) -> None:
        if self._pass is not None:
            self._perturb(_own_parameters(module))

    def _after_inner(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._pass is not None:
            self._restore(_own_parameters(module))

    def _perturb(self, parameters: list[nn.Parameter]) -> None:
        """Point each parameter at theta + eps*z (even passes) or theta - eps*z (odd) of the pass's sample, z drawn
        again from its seed into the buffer that becomes the perturbed weights."""
        sample, sign = divmod(self._pass, 2)
        for p in parameters:
            index, slot = self.residency.slot_of(p)
            theta = self.residency.weight_view(index, slot)
            z = self.optimizer.direction(self._step, sample, self.blocks[index].layout.slots[slot].name, theta)
            p.data = self.optimizer.perturb_into(z, theta, -1 if sign else 1)

    def _restore(self, parameters: list[nn.Parameter]) -> None:
        for p in parameters:
            p.data = self.residency.weight_view(*self.residency.slot_of(p))

    def _rows_of(self, value: Any, pass_index: int) -> Any:
        """`value` with every batched tensor (2+ dims, passes x rows first) cut to the pass's rows."""
        if torch.is_tensor(value):
            if value.dim() >= 2 and value.shape[0] == self._passes * self._rows:
                return value[pass_index * self._rows : (pass_index + 1) * self._rows]
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._rows_of(item, pass_index) for item in value)
        if isinstance(value, dict):
            return {key: self._rows_of(item, pass_index) for key, item in value.items()}
        return value


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _concatenate(outputs: list[Any], rows: int) -> Any:
    """The passes' outputs as one batch, in pass order. An output computed from unbatched inputs (one row,
    e.g. position embeddings) differs per pass too, so each is broadcast to the pass's rows first."""
    first = outputs[0]
    if torch.is_tensor(first):
        if first.shape[0] not in (rows, 1):
            raise NotImplementedError(f"cannot tell the batch dimension of an output of shape {tuple(first.shape)}")
        return torch.cat([out.expand(rows, *out.shape[1:]) for out in outputs])
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate(list(items), rows) for items in zip(*outputs))
    return first
