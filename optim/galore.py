"""GaLore AdamW on flat chunks: Adam in a low-rank projection of each weight matrix's gradient (Zhao et al., 2024).

For each projectable 2-D weight (see `optim.projection`), of shape (m, n) with r = min(rank, m, n):

    every update_proj_gap steps (steps 1, T+1, 2T+1, ...):  P <- first r singular vectors of the full gradient G
    R = project_down(G, P)                   (m, r) or (r, n): the gradient in the subspace
    Adam moments of R  ->  N = m_hat / (sqrt(v_hat) + eps)   in the subspace, with galore-torch's arithmetic
    W <- W - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * scale * project_up(N, P)
    W <- W - lr * weight_decay * W           (after the update, as galore-torch does)

The moments are kept across a refresh, although the new P spans another subspace: that is what the reference
does. Every other tensor (embeddings, norms, biases, the head) gets the same Adam without projection: the
reference's parameter group without `rank`. The whole optimizer equals `galore_torch.GaLoreAdamW` with the
projectable weights in a group with `rank`, `update_proj_gap`, `scale` and `proj_type="std"`.

Streaming: the projector P of every matrix lives in the block's "projector" state chunk (r x the smaller
dimension), so it streams with the block like the moments. The refresh needs the full gradient of the matrix; the
engine runs a block's update only once the block's backward has ended (and, with gradient accumulation, after the
last micro-batch), when the block's gradient chunk holds every matrix's whole, final gradient. So the SVD runs
inside the block's update on the optimizer thread, from the gradient chunk, and nothing is kept between steps but
the chunks. State per parameter of an (m, n) matrix: 4 * r * (2 max(m, n) + min(m, n)) / (m n) bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from . import projection
from .base import ChunkOptimizer, StateSpec
from .hyperparameters import adam_errors
from .layout import ChunkLayout, Slot
from .packing import Region, pack
from .projection import HEADS, Side

__all__ = ["GaLore", "galore_adam_update"]


@dataclass(frozen=True)
class _Tensor:
    """One tensor's plan: `side` and `rank` are None for full-rank Adam; `projector` is then empty."""

    slot: Slot
    side: Side | None
    rank: int
    projector: Region
    moments: Region


@functools.cache
def _plan(layout: ChunkLayout, rank: int, full_rank: tuple[str, ...]) -> tuple[tuple[_Tensor, ...], int, int]:
    """Each tensor's plan, the projector chunk's length and the moment chunks' length."""
    sides, ranks, projector_shapes, moment_shapes = [], [], [], []
    for slot in layout.slots:
        shape = tuple(slot.shape)
        side = projection.side_of(shape) if projection.is_projectable(slot, full_rank) else None
        r = min(rank, *shape) if side else 0
        sides.append(side)
        ranks.append(r)
        projector_shapes.append(projection.projector_shape(shape, r, side) if side else (0,))
        moment_shapes.append(projection.low_rank_shape(shape, r, side) if side else shape)
    projectors, projector_numel = pack(projector_shapes)
    moments, moment_numel = pack(moment_shapes)
    tensors = tuple(map(_Tensor, layout.slots, sides, ranks, projectors, moments))
    return tensors, projector_numel, moment_numel


class GaLore(ChunkOptimizer):
    """GaLore AdamW, equal to `galore_torch.GaLoreAdamW` (proj_type "std").

    Args:
        lr, betas, eps, weight_decay: as galore_torch.GaLoreAdamW, whose defaults these are (eps 1e-6, no weight
            decay).
        rank: rank of the projection of each matrix (capped at its smaller dimension).
        update_proj_gap: steps between projector refreshes (T).
        scale: factor on the projected-back update (galore-torch's `scale`; the paper uses 0.25).
        full_rank: name fragments of 2-D weights to keep on full-rank Adam (default: untied output heads).

    Raises:
        ValueError: a hyperparameter is out of range (all of them are reported at once).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        full_rank: Collection[str] = HEADS,
    ) -> None:
        errors = adam_errors(lr, betas, eps, weight_decay)
        if rank < 1:
            errors.append(f"rank={rank} must be >= 1")
        if update_proj_gap < 1:
            errors.append(f"update_proj_gap={update_proj_gap} must be >= 1")
        if scale <= 0:
            errors.append(f"scale={scale} must be > 0")
        if errors:
            raise ValueError("GaLore: " + "; ".join(errors))
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
        self.full_rank = tuple(full_rank)

    def state_specs(self, layout: ChunkLayout) -> dict[str, StateSpec]:
        _, projector_numel, moment_numel = _plan(layout, self.rank, self.full_rank)
        return projection.state_specs(moment_numel, projector_numel)

    def step(
        self,
        params: torch.Tensor,
        grads: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        step: int,
        layout: ChunkLayout,
    ) -> None:
        tensors, _, _ = _plan(layout, self.rank, self.full_rank)
        refresh = (step - 1) % self.update_proj_gap == 0
        for t in tensors:
            param, grad = t.slot.view(params), t.slot.view(grads)
            exp_avg, exp_avg_sq = t.moments.view(state["exp_avg"]), t.moments.view(state["exp_avg_sq"])
            basis = None
            if t.side is not None:
                basis = (t.projector.view(state["projector"]), t.side)
                if refresh:
                    basis[0].copy_(projection.orthogonal_basis(grad, t.rank, t.side))
            galore_adam_update(
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                basis,
                step=step,
                lr=self.lr,
                beta1=self.betas[0],
                beta2=self.betas[1],
                eps=self.eps,
                weight_decay=self.weight_decay,
                scale=self.scale,
            )

    def __repr__(self) -> str:
        return (
            f"GaLore(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
            f"rank={self.rank}, update_proj_gap={self.update_proj_gap}, scale={self.scale}, "
            f"full_rank={self.full_rank})"
        )


def galore_adam_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: tuple[torch.Tensor, Side] | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """One update in place, op for op galore-torch's AdamW.step in fp32.

    Args:
        basis: (P, side) for a projected matrix, whose moments have the low-rank shape; None for full rank.
    """
    low = grad if basis is None else projection.project_down(grad, *basis)
    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    update = exp_avg / denom
    if basis is not None:
        update = projection.project_up(update, *basis) * scale
    param.add_(update, alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)
