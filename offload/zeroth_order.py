"""Streamed MeZO, the ZO2 way: each block's weights are read and written once per step.

MeZO needs two forward passes per sample (weights theta + eps*z, then theta - eps*z). Streaming them one after
the other would read every block twice. Instead the batch is repeated once per pass ("stream") and the model
runs one forward over all of them. As each block is resident, its module runs once per stream, each time with
its own perturbed weights, on that stream's rows:

    before the module (forward pre-hook): apply the previous step's update to the block (lazily, ZO2), set the
        weights of stream 0, and hand the module only stream 0's rows
    after it (forward hook): run the module's forward again for every other stream with its weights, put theta
        back, and return the streams' outputs concatenated in stream order

The previous step's update needs that step's projected gradients, known only once its forward has finished; it
is applied when the block is next loaded, so the weights are read once (update, then perturb) and written once.
`flush` applies a pending update to every block, for when the weights are read outside a step (eval, export,
checkpoint). The embedding and head blocks are held through the step: they are used at both of its ends.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..optim.mezo import MeZO
from .chunks import Tier

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ZerothOrderPass"]


class ZerothOrderPass:
    """The zeroth-order step of an engine whose optimizer is `optim.MeZO`."""

    def __init__(self, engine: Engine, optimizer: MeZO) -> None:
        self.engine, self.optimizer = engine, optimizer
        self.pending: tuple[int, list[float]] | None = None  # (step, g per sample) not yet applied to weights
        self._streams = 0  # 2 x samples while a step's forward runs, else 0
        self._rows = 0  # rows of the batch, per stream
        self._fresh: set[int] = set()  # blocks brought up to date in this step
        self._call: tuple[list[tuple[nn.Parameter, int, int]], tuple, dict] | None = None
        self._z: dict[int, torch.Tensor] = {}  # z of the current sample, by parameter position in the module

    def install(self, module: nn.Module, blocks: tuple[int, ...]) -> None:
        """Hook `module`, after the engine's hook that holds its blocks and before the one that releases them."""
        module.register_forward_pre_hook(partial(self._before, blocks), with_kwargs=True)
        module.register_forward_hook(partial(self._after, blocks), with_kwargs=True, prepend=True)

    # ----------------------------------------------------------------------------------------- the step

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One MeZO step; returns the mean loss over all perturbed passes."""
        engine = self.engine
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("MeZO needs `labels` in the batch: it measures the loss, there is no backward")
        self._streams, self._rows = 2 * self.optimizer.samples, len(labels)
        inputs = {key: value.repeat(self._streams, *[1] * (value.dim() - 1)) for key, value in batch.items() if key != "labels"}
        engine.step_count += 1
        self._fresh = set()
        outer = [index for index, s in enumerate(engine._blocks) if not s.block.is_layer]
        engine.model.eval()  # MeZO measures the loss without dropout, as its reference does
        try:
            for index in outer:
                engine._hold(index)
            with torch.no_grad():
                logits = engine.model(**inputs, use_cache=False).logits
            for index in range(len(engine._blocks)):
                self._bring_up_to_date(index)  # a block no module used this step still takes the update
        finally:
            for index in outer:
                engine._release(index)
            self._streams = 0
        losses = [
            engine.model.loss_function(
                logits=logits[k * self._rows : (k + 1) * self._rows], labels=labels, vocab_size=engine.model.config.vocab_size
            )
            for k in range(2 * self.optimizer.samples)
        ]
        gradients = [self.optimizer.projected_gradient(losses[2 * i], losses[2 * i + 1]) for i in range(self.optimizer.samples)]
        self.pending = (engine.step_count, gradients)
        return float(torch.stack(losses).mean())  # host sync: the loss value

    def flush(self) -> None:
        """Apply the pending update to every block now."""
        if self.pending is None:
            return
        for s in self.engine._blocks:
            with self.engine._in_host(s.weights, dirty=True) as flat:
                for slot in s.layout.slots:
                    self.optimizer.update(slot.view(flat), slot.name, *self.pending)
        self.pending = None

    def _bring_up_to_date(self, index: int) -> None:
        """Apply the previous step's update to block `index` once, the first time this step touches it."""
        if index in self._fresh:
            return
        self._fresh.add(index)
        if self.pending is None:
            return
        s = self.engine._blocks[index]
        flat = self.engine.store.acquire(s.weights, Tier.DEVICE)
        for slot in s.layout.slots:
            self.optimizer.update(slot.view(flat), slot.name, *self.pending)
        self.engine.store.release(s.weights, Tier.DEVICE, dirty=True)

    # -------------------------------------------------------------------------------------- the hooks

    def _before(self, blocks: tuple[int, ...], module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self._streams:
            return None
        if self._call is not None:
            raise NotImplementedError(f"{type(module).__name__} runs inside another streamed module; MeZO streaming "
                                      "needs the modules that own weights to be disjoint")
        for index in blocks:
            self._bring_up_to_date(index)
        slots = self.engine._slot_of
        parameters = [(p, *slots[id(p)]) for p in module.parameters()]
        self._call = (parameters, args, kwargs)
        self._set_weights(parameters, stream=0)
        return self._rows_of(args, 0), self._rows_of(kwargs, 0)

    def _after(self, blocks: tuple[int, ...], module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._streams:
            return None
        parameters, full_args, full_kwargs = self._call
        outputs = [output]
        try:
            for stream in range(1, self._streams):
                self._set_weights(parameters, stream)
                outputs.append(module.forward(*self._rows_of(full_args, stream), **self._rows_of(full_kwargs, stream)))
        finally:
            for p, index, slot in parameters:
                p.data = self._theta(index, slot)
            self._call = None
            self._z = {}
        return _concatenate(outputs, self._rows)

    def _set_weights(self, parameters: list[tuple[nn.Parameter, int, int]], stream: int) -> None:
        """Point each parameter at theta + eps*z (even streams) or theta - eps*z (odd) of the stream's sample.

        The + stream draws z and keeps it for the - stream that follows (one module's worth of memory), so z is
        generated once per sample here and once more for the update in the next step."""
        sample, sign = divmod(stream, 2)
        for position, (p, index, slot) in enumerate(parameters):
            theta = self._theta(index, slot)
            if sign == 0:
                name = self.engine._blocks[index].layout.slots[slot].name
                self._z[position] = self.optimizer.direction(self.engine.step_count, sample, name, theta)
            p.data = self.optimizer.perturbed(theta, self._z[position], -1 if sign else 1)

    def _theta(self, index: int, slot: int) -> torch.Tensor:
        s = self.engine._blocks[index]
        return s.layout.slots[slot].view(s.weights.typed(Tier.DEVICE))

    def _rows_of(self, value: Any, stream: int) -> Any:
        """`value` with every batched tensor (2+ dims, streams x rows first) cut to the stream's rows."""
        if torch.is_tensor(value):
            if value.dim() >= 2 and value.shape[0] == self._streams * self._rows:
                return value[stream * self._rows : (stream + 1) * self._rows]
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._rows_of(item, stream) for item in value)
        if isinstance(value, dict):
            return {key: self._rows_of(item, stream) for key, item in value.items()}
        return value


def _concatenate(outputs: list[Any], rows: int) -> Any:
    """The streams' outputs as one batch, in stream order. An output computed from unbatched inputs (one row,
    e.g. position embeddings) differs per stream too, so each is broadcast to the stream's rows first."""
    first = outputs[0]
    if torch.is_tensor(first):
        if first.shape[0] not in (rows, 1):
            raise NotImplementedError(f"cannot tell the batch dimension of an output of shape {tuple(first.shape)}")
        return torch.cat([out.expand(rows, *out.shape[1:]) for out in outputs])
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate(list(items), rows) for items in zip(*outputs))
    return first
