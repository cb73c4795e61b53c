"""The first-order training step, read top to bottom; its hooks follow in the order they fire.

    forward:  for each block i: hold i (waits for its prefetch) -> run -> release i; prefetch i+1 .. i+k
    backward: for each layer i, last first: hold i with its gradient chunk -> recompute (recompute.py) ->
              backward -> release; on the last micro-batch its optimizer update starts on the worker thread,
              overlapped with the backward of layer i-1 (Fuyou)

The embedding and head blocks run under ordinary autograd: they are held again, just before their backward, by a
hook on their output's gradient, and released once their own backward is done (outer_holds.py). With exact
clipping the updates still run inside backward, as if no clipping were needed, and `finish_updates` validates them
against the whole-model gradient norm once it is known: kept, or rolled back, and then the step's passes run again
from the same RNG state with the known coefficient (updates.py, Note [Speculative updates]). Without a swap
directory to keep the rolled-back bytes in, they wait for that norm instead.

Threads: the step and every hook run on the compute thread (autograd runs backward hooks on the thread that
called backward, on CPU and CUDA alike). Updates run on the worker: Note [The worker owns a block's chunks].
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from .block_state import BlockState
from .chunks import Tier
from .clip_mode import ClipMode
from .clipping import Clipping
from .outer_holds import OuterHolds
from .recompute import rng_state, set_rng_state
from .residency import Residency, tensors_of
from .timers import Timers
from .updates import UpdateWorker

__all__ = ["FirstOrderStep", "micro_batches", "to_device"]

Batch = dict[str, torch.Tensor]


class FirstOrderStep:
    """Forward and backward over the micro-batches of one optimizer step, with the updates they start.

    Also the `LayerRunner` that the streamed layer calls (recompute.py) report their backward to."""

    def __init__(
        self, model: nn.Module, residency: Residency, updates: UpdateWorker, clipping: Clipping, timers: Timers
    ) -> None:
        self.model, self.residency, self.updates, self.clipping = model, residency, updates, clipping
        self.blocks: list[BlockState] = residency.blocks
        self.timers = timers
        self.first_layer = min(index for index, state in enumerate(self.blocks) if state.block.is_layer)
        self._training = False  # inside __call__: forward hooks the outer blocks' backward
        self._last_micro = True  # the micro-batch whose backward finishes the gradients
        self._outer = OuterHolds(residency, self._outer_complete, self._outer_released)
        self._step = 0  # the optimizer step being computed: what the updates it starts are numbered
        self._coefficient: torch.Tensor | None = None  # a redone step's clipping coefficient (`finish_updates`)
        self.skipped = False  # the last step's gradient norm was not finite: it changed nothing (`finish_updates`)
        self.skipped_steps = self.redone_steps = 0  # exact clipping's steps skipped, and rolled back and redone
        self.grad_norm: float | None = None  # exact clipping: the last step's global gradient norm
        residency.observers.append(self._after_outer_forward)

    def __call__(self, micro_batches: list[Batch], step: int) -> float:
        """Optimizer step `step` over `micro_batches`; returns the mean loss."""
        self.model.train()
        self._step = step
        self._training = self.residency.prefetch_grads = True
        try:
            rng = rng_state(self.residency.device)
            losses = self.run_passes(micro_batches)
            redo = self.finish_updates(step)
            if redo is not None:  # rolled back: the same passes, the same dropout masks, clipped updates in backward
                set_rng_state(rng, self.residency.device)
                self._coefficient = redo
                self.run_passes(micro_batches)
                self.updates.wait()
        except BaseException:
            self.updates.abandon()
            raise
        finally:
            self._training = self.residency.prefetch_grads = False
            self._coefficient = None
        self.residency.prefetch(range(self.residency.prefetch_depth))  # the next step's first blocks
        return float(torch.stack([loss.detach() for loss in losses]).mean())  # host sync: the loss value

    def close(self) -> None:
        """Remove what this step hooked into the model's parameters (OuterHolds.close)."""
        self._outer.close()

    def run_passes(self, micro_batches: list[Batch]) -> list[torch.Tensor]:
        """Forward and backward of each micro-batch, one after another (the updates they start run on); the losses."""
        losses = []
        for k, micro in enumerate(micro_batches):
            self._last_micro = k == len(micro_batches) - 1
            self._outer.begin()
            start = time.perf_counter()
            with self.residency.saved_weights():
                loss = self.model(**micro, use_cache=False).loss
            forward_end = time.perf_counter()
            (loss / len(micro_batches)).backward()
            self._outer.end_backward()
            self.timers.add("forward", forward_end - start)
            self.timers.add("backward", time.perf_counter() - forward_end)
            losses.append(loss.detach())
        return losses

    def finish_updates(self, step: int) -> torch.Tensor | None:
        """After the whole backward: settle the step's updates, and end them all before the next forward, which must
        not see half-updated weights. Returns the clipping coefficient to run the step again with, or None.

        Exact clipping: the global norm decides (Note [Speculative updates], updates.py). Speculative, a coefficient
        of exactly 1.0 keeps the updates made in backward; any other rolls them back, and the step runs again with
        the coefficient (`redone_steps`): its gradients were consumed by the speculative updates, so they are made
        again rather than kept. Not speculative (no swap directory), the updates start only now, from the gradients
        kept. A norm that is not finite skips the step: no update, every block as it was before it (`skipped`,
        `skipped_steps`)."""
        self.skipped = False
        exact = self.clipping.max_grad_norm is not None and self.clipping.mode is ClipMode.EXACT
        if exact:
            self.updates.wait()  # the speculative updates are done: their kept versions are complete
            total = self.clipping.global_norm(self.blocks)
            coefficient = self.clipping.coefficient(total)
            self.grad_norm = float(total)  # host sync: the norm
            if not math.isfinite(self.grad_norm):
                if self.clipping.speculative:
                    self.updates.roll_back()
                self.updates.discard_grads()
                self.skipped = True
                self.skipped_steps += 1
            elif self.clipping.speculative and bool(coefficient == 1.0):  # host sync: the coefficient
                self.updates.commit()
            elif self.clipping.speculative:
                self.updates.roll_back()
                self.redone_steps += 1
                return coefficient
            else:
                for index, state in enumerate(self.blocks):
                    if state.trainable:
                        self.updates.submit(index, step, coefficient)
        self.updates.wait()
        return None

    def saved_weights(self) -> torch.autograd.graph.saved_tensors_hooks:
        """For StreamedLayer's kept graphs: Note [Saved weight views] (residency.py)."""
        return self.residency.saved_weights()

    # ------------------------------------------------------------------------- the hooks, in firing order

    def _after_outer_forward(self, blocks: tuple[int, ...], module: nn.Module, args: Any, output: Any) -> None:
        """Forward, after an embedding or head module: hook its backward (layers hook theirs in recompute.py)."""
        is_layer = len(blocks) == 1 and self.blocks[blocks[0]].block.is_layer
        if not self._training or not torch.is_grad_enabled() or is_layer:
            return
        tensor = next((t for t in tensors_of(output) if t.requires_grad), None)
        if tensor is not None:
            self._outer.track(blocks, module, args, tensor)
        elif blocks[0] < self.first_layer:
            # A frozen embedding's output needs no gradient, but the layers' streamed calls only run their
            # backward (and so train the adapters inside them) for an input that requires one.
            for t in tensors_of(output):
                if t.is_floating_point() and t.is_leaf:
                    t.requires_grad_(True)

    def begin_layer_backward(self, index: int) -> None:
        """Backward of layer `index` starts (called by its streamed call): hold it with its gradient chunk."""
        self.residency.hold(index, grads=self.blocks[index].trainable)
        self.residency.prefetch(range(index - 1, index - 1 - self.residency.prefetch_depth, -1), grads=True)
        if self._last_micro:
            # This layer's optimizer state, for its update; with the first layer, also the embedding's and head's:
            # the embedding's update comes right after backward, with nothing left to hide its loads behind (and
            # with updates after backward, the embedding's comes first).
            upcoming = [index]
            if index == self.first_layer:
                upcoming += [i for i, state in enumerate(self.blocks) if not state.block.is_layer]
            for chunk in [chunk for i in upcoming for chunk in self.blocks[i].states.values()]:
                self.residency.store.prefetch(chunk, Tier.HOST)

    def end_layer_backward(self, index: int) -> None:
        """Backward of layer `index` is done: on the last micro-batch its gradient is final, its update may start."""
        trainable = self.blocks[index].trainable
        if self._last_micro and trainable:
            self.clipping.finish_block(self.blocks[index])
        self.residency.release(index, grads=trainable)
        if self._last_micro and trainable and self.clipping.updates_in_backward:
            self.updates.submit(index, self._step, self._coefficient)

    def _outer_complete(self, index: int) -> None:
        """An embedding or head block's gradient is complete for this micro-batch (it is still held)."""
        if self._last_micro:
            self.clipping.finish_block(self.blocks[index])

    def _outer_released(self, index: int) -> None:
        """...and released: on the last micro-batch its update may start, unless updates wait for backward's end."""
        if self._last_micro and self.clipping.updates_in_backward:
            self.updates.submit(index, self._step, self._coefficient)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def micro_batches(batch: Batch | list[Batch], accumulation_steps: int, device: torch.device) -> list[Batch]:
    """`batch` cut into `accumulation_steps` micro-batches (a list is taken as the micro-batches), on `device`.

    Raises:
        ValueError: the batch size is not a multiple of `accumulation_steps`.
    """
    if isinstance(batch, list):
        return [to_device(micro, device) for micro in batch]
    size = len(next(iter(batch.values())))
    if size % accumulation_steps:
        raise ValueError(
            f"batch size {size} is not divisible by accumulation_steps={accumulation_steps}; "
            "use a batch size that is a multiple of it"
        )
    parts = [dict(zip(batch, values)) for values in zip(*(v.chunk(accumulation_steps) for v in batch.values()))]
    return [to_device(micro, device) for micro in parts]
