"""Weights into chunks, and the module's parameters turned into placeholders that view the chunks when held.

`copy_weights_in` fills the chunks once (from the model's files or from the module itself, block by block, so
a model larger than RAM is never whole in memory), and again when a checkpoint is loaded. `bind_parameters`
then leaves the module only empty placeholders: from here on the chunks are the one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import torch
from torch import nn

from ..optim.layout import ChunkLayout
from .block_state import BlockState, Bound, placeholder
from .blocks import BlockPlan
from .chunks import Chunk
from .weights import load_block_weights

__all__ = ["bind_parameters", "copy_weights_in"]

InHost = Callable[..., AbstractContextManager[torch.Tensor]]
"""`Residency.in_host`: a chunk held in host memory for a with-statement, `dirty=True` when it is written."""


def copy_weights_in(
    blocks: list[BlockState],
    plan: BlockPlan,
    directory: Path | None,
    in_host: InHost,
    *,
    adapter_tensors: Callable[[Path, list[str]], list[torch.Tensor]] | None = None,
) -> None:
    """Weights (and fp32 masters) of every block from `directory`'s safetensors, or from the module.

    `adapter_tensors`: `directory` is a peft adapter directory, read by this function; only the trainable
    (adapter) weights are copied, the frozen base is left as it is."""
    for state in blocks:
        for layout, chunks in _parts_to_fill(state, adapter=adapter_tensors is not None):
            names = [slot.name for slot in layout.slots]
            if adapter_tensors is not None:
                sources: Iterable[torch.Tensor] = adapter_tensors(directory, names)
            else:  # read one tensor at a time, copied into every chunk of the part before the next is read
                sources = load_block_weights(state.block, plan.aliases, directory, names)
            with ExitStack() as held:
                flats = [held.enter_context(in_host(chunk, dirty=True)) for chunk in chunks]
                if state.quantized is not None and chunks == [state.frozen]:
                    state.quantized.quantize_into(flats[0], sources)
                    continue
                for views, source in zip(zip(*(layout.views(flat) for flat in flats)), sources, strict=True):
                    for view in views:
                        view.copy_(source)


def _parts_to_fill(state: BlockState, *, adapter: bool) -> Iterator[tuple[ChunkLayout, list[Chunk]]]:
    if state.trainable:
        yield state.layout, [c for c in (state.weights, state.master) if c is not None]
    if not adapter and state.frozen is not None and state.frozen.source is None:  # a source reads it itself
        yield state.frozen_layout, [state.frozen]


def bind_parameters(
    model: nn.Module, plan: BlockPlan, blocks: list[BlockState], *, untie: bool, dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Give every parameter an empty placeholder (a real Parameter where the module has a meta one).

    `untie`: a tied weight's other use (the head) gets a Parameter object of its own over the same chunk, so each
    use adds its gradient into the chunk as soon as it is computed. One shared object makes autograd keep the
    head's vocab x hidden gradient until the embedding's arrives at the end of backward and sum the two in a
    third tensor: memory outside the budget. With gradient accumulation the shared object stays (untie=False):
    PyTorch adds the two uses' sum into the accumulated gradient, and only that order is equal to in-memory
    training to the bit.
    """
    for state in blocks:
        parts: list[tuple[ChunkLayout, list[nn.Parameter], Bound, bool]] = [
            (state.layout, state.params, state.aliases, True)
        ]
        if state.frozen_layout is not None:
            parts.append((state.frozen_layout, state.frozen_params, state.frozen_aliases, False))
        for layout, params, twins, trainable in parts:
            for i, slot in enumerate(layout.slots):
                name, p = slot.name, state.block.params[slot.name]
                aliases = [alias for alias, owner in plan.aliases.items() if owner == name]
                if p.is_meta:  # a meta tensor cannot take CPU data in place: give the module a real Parameter
                    p = nn.Parameter(placeholder(dtype, device), requires_grad=trainable)
                    for target in [name] + ([] if untie else aliases):
                        _set_parameter(model, target, p)
                    state.block.params[name] = params[i] = p
                p.data = placeholder(dtype, device)
                p.requires_grad_(trainable)
                for alias in aliases if untie else []:
                    twin = nn.Parameter(placeholder(dtype, device), requires_grad=trainable)
                    _set_parameter(model, alias, twin)
                    twins.append((twin, i))


def _set_parameter(model: nn.Module, name: str, parameter: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, parameter)

