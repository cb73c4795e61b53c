"""How each decoder layer bridges its forward and its backward: recompute, keep, offload, or let the rates choose
(activation_choice.py makes that choice). Apart from the engine, so that a command line can offer it without torch.

- "recompute" (`StreamedCheckpoint`): keep only the layer's input, run its forward again in backward. Activation
  memory of one layer, a third more compute. The default: it needs nothing but the budget.
- "keep" (`StreamedLayer`): keep the layer's graph in memory until its backward, as plain PyTorch does; no
  recompute, but activation memory grows with batch x sequence x layers, outside the budget.
- "offload" (`OffloadedLayer`, activations.py): keep the graph, with its saved tensors written to the swap directory
  (on CUDA through pinned host memory) and read back ahead of the layer's backward; no recompute, within
  `activation_memory`. Needs a swap directory.
- "auto": offload where moving a layer's saved bytes costs less time than recomputing the layer
  (`activation_choice.offload_pays`), else recompute. The decoder layers of a model are alike, so the choice is one
  for all of them.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

__all__ = ["ActivationMode", "activation_mode"]


class ActivationMode(str, Enum):
    """What a decoder layer keeps between its forward and its backward (see the module's docstring)."""

    RECOMPUTE = "recompute"
    KEEP = "keep"
    OFFLOAD = "offload"
    AUTO = "auto"


def activation_mode(activations: ActivationMode | str, checkpoint_activations: bool | None,
                    nvme: str | Path | None) -> ActivationMode:
    """The mode asked for; `checkpoint_activations` is the older spelling (True: "recompute", False: "keep").

    Raises:
        ValueError: an unknown mode, both spellings disagreeing, or "offload" without a swap directory.
    """
    try:
        mode = ActivationMode(activations)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in ActivationMode)
        raise ValueError(f"activations={activations!r} is not one of {choices}") from None
    if checkpoint_activations is not None:
        alias = ActivationMode.RECOMPUTE if checkpoint_activations else ActivationMode.KEEP
        if mode is not ActivationMode.RECOMPUTE and mode is not alias:
            raise ValueError(f"checkpoint_activations={checkpoint_activations} contradicts activations={mode.value!r}; "
                             "pass only activations")
        mode = alias
    if mode is ActivationMode.OFFLOAD and nvme is None:
        raise ValueError("activations='offload' writes the layers' saved tensors to the swap directory, and there is "
                         "none: pass Budget(nvme=...) (finetune run --nvme DIR), or use activations='recompute'")
    return mode
