"""FRUGAL on flat chunks: AdamW in a state-full subspace of each gradient, state-free signSGD on the rest.

FRUGAL (Zmushko et al., 2025, reference code SelfRefLab/FRUGAL) splits the gradient G of each projectable weight
matrix (see `optim.projection`: embeddings, norms, biases and the head stay on full AdamW) into a part in a
subspace, updated by AdamW with moments kept only for that part, and the rest, updated without state:

    W <- W * (1 - lr * weight_decay)                        (every tensor, first, as the reference and torch do)
    every update_gap steps (1, T+1, 2T+1, ...): choose the subspace; reset its moments if reset_statistics
    W <- W + AdamW step of the subspace part (bias correction counts from the last reset)
    W <- W - lr * inactive_lr_scale * sign(G - subspace part)      (or without sign: plain SGD)

Options and the reference variant each reproduces (reference `inactive_update_rule` = `inactive_update`,
`proj_params_lr_scale` fixed at 1.0, its value in all of the paper's runs):

- `subspace="columns"`: `CoordAdamW` with `coord_choice="columns"`: k = int(n * density) random columns of the
  (m, n) matrix; moments (m, k). The columns are drawn by `column_subset` from a generator seeded with
  (seed, first step of the period, tensor name) instead of the global RNG, so they are the same in the engine and
  in memory, in any streaming order, and after a resume, without being stored; and they are kept in ascending
  order (the reference keeps randperm's), so moments kept without reset stay with their columns where they can.
- `subspace="svd"`: `GaloreAdamW` with `proj_side="std"`, `proj_type="svd"`: the first r = round(density * d)
  singular vectors of G on the smaller dimension d; moments of the projected gradient (r x the larger dimension);
  the projector lives in the block's "projector" state chunk and is recomputed from the whole gradient chunk in
  the block's update, as in `optim.galore`. The state-free part is G - P(P^T G).
- Not offered: `BlockAdamW`'s whole-tensor selection (its state size depends on which tensors are picked, while a
  block's state chunks have a fixed size; column selection saves the same memory at a fixed size), the "no"
  inactive rule (that is GaLore: use `optim.GaLore`), and the dynamic rho / T schedules.

The AdamW arithmetic is torch.optim.AdamW's (`optim.adamw.adamw_update`) rather than the reference's
Hugging Face-style AdamW; the two differ by float rounding only (lerp against mul + add), and this way
density=1 with columns and no reset equals torch.optim.AdamW bit for bit. State per parameter of a projectable
(m, n) matrix: 8 * k / n bytes with columns; 4 * r * (2 max(m, n) + min(m, n)) / (m n) with svd.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch

from . import projection
from .adamw import adamw_update
from .base import ChunkOptimizer, StateSpec
from .hyperparameters import adam_errors
from .layout import ChunkLayout, Slot
from .packing import Region, pack
from .projection import HEADS, Side

__all__ = ["Frugal", "TensorPlan", "column_subset", "tensor_plans"]

Subspace = Literal["columns", "svd"]
SUBSPACES: tuple[str, ...] = ("columns", "svd")
INACTIVE_UPDATES: tuple[str, ...] = ("sign_sgd", "sgd")
_Moments = tuple[torch.Tensor, torch.Tensor] | None  # (exp_avg, exp_avg_sq) of one tensor's subspace


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's plan. `mode` None is full AdamW; `size` is the number of columns or the rank."""

    slot: Slot
    mode: Subspace | None
    side: Side | None
    size: int
    projector: Region
    moments: Region


@functools.cache
def tensor_plans(
    layout: ChunkLayout, subspace: Subspace, density: float, full_rank: tuple[str, ...]
) -> tuple[tuple[TensorPlan, ...], int, int]:
    """Each tensor's plan, the projector chunk's length and the moment chunks' length."""
    plans, projector_shapes, moment_shapes = [], [], []
    for slot in layout.slots:
        shape = tuple(slot.shape)
        mode, side, size, projector, moments = None, None, 0, (0,), shape
        if projection.is_projectable(slot, full_rank) and subspace == "columns":
            mode, size = "columns", int(shape[1] * density)
            moments = (shape[0], size)
        elif projection.is_projectable(slot, full_rank):
            mode, side = "svd", projection.side_of(shape)
            size = round(density * (shape[1] if side == "right" else shape[0]))
            projector = projection.projector_shape(shape, size, side)
            moments = projection.low_rank_shape(shape, size, side)
        plans.append((slot, mode, side, size))
        projector_shapes.append(projector)
        moment_shapes.append(moments)
    projectors, projector_numel = pack(projector_shapes)
    regions, moment_numel = pack(moment_shapes)
    tensors = tuple(TensorPlan(*plan, p, m) for plan, p, m in zip(plans, projectors, regions, strict=True))
    return tensors, projector_numel, moment_numel


def column_subset(columns: int, count: int, *, seed: int, period_start: int, name: str) -> torch.Tensor:
    """`count` distinct column indices out of `columns`, ascending, for the period that starts at `period_start`.

    Drawn from a generator seeded with sha256(seed, period_start, name), so they depend on nothing else: not on the
    order in which blocks stream, nor on whether the run was resumed. Ascending (the reference keeps randperm's
    order) so that moments kept across a change stay with the same columns where they can: with density 1 the
    subspace is the whole matrix in order and, without reset, FRUGAL is exactly AdamW.
    """
    digest = hashlib.sha256(f"{seed}/{period_start}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(columns, generator=generator)[:count].sort().values


class Frugal(ChunkOptimizer):
    """FRUGAL: AdamW in a subspace of density `density`, signSGD (or SGD) on the rest; see the module docstring.

    Args:
        lr, betas, eps, weight_decay: AdamW's, as torch.optim.AdamW (defaults too).
        density: fraction of each projectable matrix in the state-full subspace (rho), in [0, 1].
        subspace: "columns" (random columns, CoordAdamW) or "svd" (top singular vectors, FRUGAL's GaloreAdamW).
        update_gap: steps between subspace changes (T).
        reset_statistics: zero the subspace's moments and restart its bias correction at each change.
        inactive_update: "sign_sgd" or "sgd" for the part outside the subspace.
        inactive_lr_scale: its learning rate is lr * inactive_lr_scale (the paper: 1.0 pre-training, 0.1
            fine-tuning).
        seed: seeds the column picks.
        full_rank: name fragments of 2-D weights kept on full AdamW (default: untied output heads).

    Raises:
        ValueError: a hyperparameter is out of range (all of them are reported at once).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        density: float = 0.25,
        subspace: Subspace = "columns",
        update_gap: int = 200,
        reset_statistics: bool = True,
        inactive_update: Literal["sign_sgd", "sgd"] = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        seed: int = 0,
        full_rank: Collection[str] = HEADS,
    ) -> None:
        errors = adam_errors(lr, betas, eps, weight_decay)
        if not 0.0 <= density <= 1.0:
            errors.append(f"density={density} must be in [0, 1]")
        if subspace not in SUBSPACES:
            errors.append(f"subspace={subspace!r} must be one of {SUBSPACES}")
        if update_gap < 1:
            errors.append(f"update_gap={update_gap} must be >= 1")
        if inactive_update not in INACTIVE_UPDATES:
            errors.append(f"inactive_update={inactive_update!r} must be one of {INACTIVE_UPDATES}")
        if inactive_lr_scale < 0:
            errors.append(f"inactive_lr_scale={inactive_lr_scale} must be >= 0")
        if errors:
            raise ValueError("Frugal: " + "; ".join(errors))
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.density, self.subspace, self.update_gap = density, subspace, update_gap
        self.reset_statistics = reset_statistics
        self.inactive_update, self.inactive_lr_scale = inactive_update, inactive_lr_scale
        self.seed, self.full_rank = seed, tuple(full_rank)

    def state_specs(self, layout: ChunkLayout) -> dict[str, StateSpec]:
        _, projector_numel, moment_numel = tensor_plans(layout, self.subspace, self.density, self.full_rank)
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
        tensors, _, _ = tensor_plans(layout, self.subspace, self.density, self.full_rank)
        period_start = step - (step - 1) % self.update_gap
        adam_step = step - period_start + 1 if self.reset_statistics else step
        for t in tensors:
            param, grad = t.slot.view(params), t.slot.view(grads)
            moments = None  # an empty subspace (density 0) has no moments
            if t.moments.numel:
                moments = (t.moments.view(state["exp_avg"]), t.moments.view(state["exp_avg_sq"]))
            if t.mode is None:
                self._adamw(param, grad, moments, step=step, weight_decay=self.weight_decay)
                continue
            if step == period_start and self.reset_statistics and moments:
                for moment in moments:
                    moment.zero_()
            param.mul_(1 - self.lr * self.weight_decay)
            if t.mode == "columns":
                rest = self._update_columns(t, param, grad, moments, period_start=period_start, adam_step=adam_step)
            else:
                projector = t.projector.view(state["projector"]) if t.projector.numel else None
                rest = self._update_svd(
                    t, param, grad, moments, projector, refresh=step == period_start, adam_step=adam_step
                )
            inactive = rest.sign_() if self.inactive_update == "sign_sgd" else rest
            param.add_(inactive, alpha=-self.lr * self.inactive_lr_scale)

    def _update_columns(
        self,
        t: TensorPlan,
        param: torch.Tensor,
        grad: torch.Tensor,
        moments: _Moments,
        *,
        period_start: int,
        adam_step: int,
    ) -> torch.Tensor:
        """AdamW on the period's columns; returns the rest of the gradient (those columns zeroed)."""
        columns = column_subset(grad.shape[1], t.size, seed=self.seed, period_start=period_start, name=t.slot.name)
        active = param[:, columns]  # (m, k) copy: AdamW updates it, then it is written back
        self._adamw(active, grad[:, columns], moments, step=adam_step, weight_decay=0.0)
        param[:, columns] = active
        rest = grad.clone()
        rest[:, columns] = 0
        return rest

    def _update_svd(
        self,
        t: TensorPlan,
        param: torch.Tensor,
        grad: torch.Tensor,
        moments: _Moments,
        projector: torch.Tensor | None,
        *,
        refresh: bool,
        adam_step: int,
    ) -> torch.Tensor:
        """AdamW in the span of the period's singular vectors; returns the rest of the gradient, G - P(P^T G)."""
        if projector is None:  # rank 0: everything is the rest
            return grad.clone()
        if refresh:
            projector.copy_(projection.orthogonal_basis(grad, t.size, t.side))
        low = projection.project_down(grad, projector, t.side)
        update = torch.zeros_like(low)  # AdamW on a zero tensor leaves exactly -step_size * m_hat / denom
        self._adamw(update, low, moments, step=adam_step, weight_decay=0.0)
        param.add_(projection.project_up(update, projector, t.side))
        return grad - projection.project_up(low, projector, t.side)

    def _adamw(
        self, param: torch.Tensor, grad: torch.Tensor, moments: _Moments, *, step: int, weight_decay: float
    ) -> None:
        if moments is None:
            return
        adamw_update(
            param,
            grad,
            *moments,
            step=step,
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            eps=self.eps,
            weight_decay=weight_decay,
        )

    def __repr__(self) -> str:
        return (
            f"Frugal(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
            f"density={self.density}, subspace={self.subspace!r}, update_gap={self.update_gap}, "
            f"reset_statistics={self.reset_statistics}, inactive_update={self.inactive_update!r}, "
            f"inactive_lr_scale={self.inactive_lr_scale}, seed={self.seed}, full_rank={self.full_rank})"
        )
