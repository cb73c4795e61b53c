"""Any chunk-wise optimizer as a plain `torch.optim.Optimizer`, for a model that fits in memory.

Each parameter is its own one-slot chunk layout (named as `named_parameters()` names it, so name-keyed choices such
as FRUGAL's seeded column picks or the full-rank head agree with the engine), and its state chunks live in
`self.state[param]`. Per-tensor math does not depend on which tensors share a block, so a model trained with
`InMemory(...)` follows the same trajectory as the same optimizer streamed by `offload.Engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from .base import ChunkOptimizer
from .layout import ChunkLayout

__all__ = ["InMemory", "embedding_names"]

_CHUNK_OPTIMIZER = "chunk_optimizer"  # state_dict key of the wrapped optimizer's own state_dict()


def embedding_names(model: nn.Module) -> frozenset[str]:
    """Names, as `model.named_parameters()` gives them, of nn.Embedding weights (a head tied to one included)."""
    embedding_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    return frozenset(name for name, p in model.named_parameters() if id(p) in embedding_ids)


class InMemory(torch.optim.Optimizer):
    """Runs `optimizer` (a ChunkOptimizer) on parameters held in memory.

    Args:
        params: parameters, `(name, parameter)` pairs (e.g. `model.named_parameters()`) or param-group dicts as
            torch accepts them; unnamed parameters are called `param<i>`. Only `lr` may differ between groups; the
            other hyperparameters are the wrapped optimizer's.
        optimizer: the chunk-wise optimizer; its `lr` is set from the group's before each group's update, so torch
            LR schedulers work.
        embeddings: names of embedding weights (see `embedding_names`), for optimizers that treat them apart.

    Raises:
        ValueError: a parameter is not float32 (chunk optimizers update fp32 master weights).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        optimizer: ChunkOptimizer,
        *,
        embeddings: Collection[str] = (),
    ) -> None:
        super().__init__(params, {"lr": optimizer.lr})
        not_fp32 = [f"{name} ({p.dtype})" for name, p in self._named() if p.dtype != torch.float32]
        if not_fp32:
            raise ValueError(f"InMemory: parameters must be float32 master weights; convert {', '.join(not_fp32)}")
        self.optimizer = optimizer
        embeddings = frozenset(embeddings)
        self._layouts = {p: ChunkLayout.from_shapes({name: p.shape}, embeddings & {name}) for name, p in self._named()}

    @classmethod
    def for_model(cls, model: nn.Module, optimizer: ChunkOptimizer) -> InMemory:
        """All of `model`'s parameters, named and with its embeddings marked."""
        return cls(list(model.named_parameters()), optimizer, embeddings=embedding_names(model))

    def _named(self) -> Iterable[tuple[str, torch.Tensor]]:
        count = 0
        for group in self.param_groups:
            names = group.get("param_names") or [f"param{count + i}" for i in range(len(group["params"]))]
            yield from zip(names, group["params"], strict=True)
            count += len(group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; each keeps its own step count, as torch's do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.optimizer.lr = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p)
        return loss

    def _update(self, p: torch.Tensor) -> None:
        layout = self._layouts[p]
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name, spec in self.optimizer.state_specs(layout).items():
                state[name] = torch.zeros(spec.numel, dtype=spec.dtype, device=p.device)
        state["step"] += 1
        chunks = {name: value for name, value in state.items() if name != "step"}
        params, grads = _padded(p, layout.numel), _padded(p.grad, layout.numel)
        self.optimizer.step(params, grads, chunks, step=state["step"], layout=layout)
        if params.data_ptr() != p.data_ptr():  # a padded copy: write the update back
            p.copy_(params[: p.numel()].view_as(p))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (state chunks per parameter) plus the wrapped optimizer's own `state_dict()`."""
        return {**super().state_dict(), _CHUNK_OPTIMIZER: self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        chunk_state = state_dict.pop(_CHUNK_OPTIMIZER, {})
        super().load_state_dict(state_dict)
        # torch casts every tensor of a floating-point parameter's state to the parameter's dtype; put codes and
        # other non-fp32 chunks back in their own dtype (exact: their values are small integers).
        for p, layout in self._layouts.items():
            if self.state.get(p):
                for name, spec in self.optimizer.state_specs(layout).items():
                    self.state[p][name] = self.state[p][name].to(spec.dtype)
        self.optimizer.load_state_dict(chunk_state)


def _padded(tensor: torch.Tensor, numel: int) -> torch.Tensor:
    """`tensor` flat and zero-padded to `numel` elements: a view when no padding is needed, else a copy."""
    if tensor.is_contiguous() and tensor.numel() == numel:
        return tensor.view(-1)
    flat = torch.zeros(numel, dtype=tensor.dtype, device=tensor.device)
    flat[: tensor.numel()].copy_(tensor.reshape(-1))
    return flat
