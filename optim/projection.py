"""Low-rank projection of a weight matrix's gradient, shared by GaLore and FRUGAL.

Which tensors: 2-D weights that are neither embeddings (`Slot.embedding`, which also marks a head tied to one)
nor an untied output head (named by `HEADS`). The references' training scripts pick the nn.Linear modules of
attention and MLP by name, which leaves embeddings, norms, biases and the head on full-rank Adam; this rule
picks the same tensors in the decoder models transformers ships, without a per-model list.

Which side: the projector goes on the smaller dimension (galore-torch's "std" projection). An (m, n) gradient
with m >= n is projected on the right, G @ P.T with P of shape (r, n), the first r right singular vectors; a
wider one on the left, P.T @ G with P of shape (m, r), the first r left singular vectors. The moments then have
shape (m, r) or (r, n): rank times the larger dimension, the projector rank times the smaller one.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import torch

from .base import StateSpec
from .layout import Slot

__all__ = [
    "HEADS",
    "Side",
    "is_projectable",
    "low_rank_shape",
    "orthogonal_basis",
    "project_down",
    "project_up",
    "projector_shape",
    "side_of",
    "state_specs",
]

HEADS: tuple[str, ...] = ("lm_head", "embed_out")
"""Name fragments of untied output heads in transformers' causal LMs (GPT-NeoX calls its head embed_out)."""

Side = Literal["left", "right"]


def is_projectable(slot: Slot, full_rank: Collection[str] = HEADS) -> bool:
    """Whether `slot` gets the low-rank treatment: 2-D, not an embedding, no fragment of `full_rank` in its name."""
    return len(slot.shape) == 2 and not slot.embedding and not any(fragment in slot.name for fragment in full_rank)


def side_of(shape: tuple[int, ...]) -> Side:
    """Project on the smaller dimension; a square matrix on the right, as galore-torch does."""
    return "right" if shape[0] >= shape[1] else "left"


def projector_shape(shape: tuple[int, ...], rank: int, side: Side) -> tuple[int, int]:
    return (rank, shape[1]) if side == "right" else (shape[0], rank)


def low_rank_shape(shape: tuple[int, ...], rank: int, side: Side) -> tuple[int, int]:
    return (shape[0], rank) if side == "right" else (rank, shape[1])


def orthogonal_basis(grad: torch.Tensor, rank: int, side: Side) -> torch.Tensor:
    """The first `rank` singular vectors of `grad` (fp32) on `side`: (rank, n) right, (m, rank) left."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return vh[:rank, :] if side == "right" else u[:, :rank]


def project_down(grad: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """(m, n) -> the low-rank shape, in the same matmul orientation as the references."""
    return torch.matmul(grad, basis.t()) if side == "right" else torch.matmul(basis.t(), grad)


def project_up(low: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """The low-rank shape -> (m, n)."""
    return torch.matmul(low, basis) if side == "right" else torch.matmul(basis, low)


def state_specs(moment_numel: int, projector_numel: int) -> dict[str, StateSpec]:
    """The state chunks of Adam with projected matrices: fp32 moments and projectors, each left out when empty."""
    specs = {}
    if moment_numel:
        specs["exp_avg"] = StateSpec(moment_numel, torch.float32)
        specs["exp_avg_sq"] = StateSpec(moment_numel, torch.float32)
    if projector_numel:
        specs["projector"] = StateSpec(projector_numel, torch.float32)
    return specs
