"""8-bit AdamW on flat chunks: bitsandbytes' AdamW8bit, with its state streamed block by block.

Both moments are stored with block-wise dynamic quantization (Dettmers et al., 2022): one uint8 code per element,
indexing bitsandbytes' dynamic map (signed for the first moment, unsigned for the second), and one fp32 absmax per
block of 256 elements. Each update dequantizes the moments, takes an fp32 Adam step and quantizes them again.

Why bitsandbytes' own kernels are called rather than rewritten: on CPU (bitsandbytes 0.50) its update is
dequantize (a C loop, code[i] * absmax) -> the fp32 Adam step in plain torch ops -> quantize (a C loop that puts
value / absmax in one of 65536 bins over [-1, 1] and stores the code nearest that bin). A vectorized torch rewrite
of that quantizer, tried while building this, matched its codes on 32M values but ran 6x slower (0.195 s against
0.031 s for 4M elements on 2 cores); calling the kernels is exact by construction and the fastest option. Each
tensor is handed to them as flat views of the chunks; its codes start at a multiple of 256, so its blocks are
exactly the blocks bitsandbytes forms for the tensor alone.

As bitsandbytes (min_8bit_size) and the Hugging Face Trainer (embeddings registered at 32 bits) do, tensors under
4096 elements and embedding weights keep fp32 moments, updated by bitsandbytes' 32-bit kernel. Both rules are
options. State per parameter: 2 bytes of codes + 8/256 of absmax = 2.03 bytes for quantized tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .base import ChunkOptimizer, StateSpec
from .hyperparameters import adam_errors
from .layout import SLOT_ALIGNMENT, ChunkLayout, Slot
from .packing import Region, pack

__all__ = ["AdamW8bit", "StatePlan", "state_plan"]

MIN_8BIT_SIZE = 4096
"""bitsandbytes' default: smaller tensors keep fp32 state (their codes would save little and cost accuracy)."""


@dataclass(frozen=True)
class StatePlan:
    """Where each tensor's state sits: codes (absmax at offset // 256) or fp32 moments."""

    quantized: tuple[tuple[Slot, Region], ...]
    full: tuple[tuple[Slot, Region], ...]
    codes_numel: int
    full_numel: int


@functools.cache
def state_plan(layout: ChunkLayout, min_8bit_size: int, fp32_embeddings: bool) -> StatePlan:
    """Where each tensor's state sits in the state chunks of a block of `layout` (tests compare states with it)."""
    quantized = [s for s in layout.slots if s.numel >= min_8bit_size and not (fp32_embeddings and s.embedding)]
    full = [s for s in layout.slots if s not in quantized]
    codes, codes_numel = pack((s.numel,) for s in quantized)
    moments, full_numel = pack((s.numel,) for s in full)
    return StatePlan(
        tuple(zip(quantized, codes, strict=True)), tuple(zip(full, moments, strict=True)), codes_numel, full_numel
    )


def _absmax(region: Region, flat: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax of each block of 256 codes of `region` (the last block may be partial)."""
    start = region.offset // SLOT_ALIGNMENT
    return flat[start : start - (-region.numel // SLOT_ALIGNMENT)]


def _flat(slot: Slot, chunk: torch.Tensor) -> torch.Tensor:
    return chunk[slot.offset : slot.offset + slot.numel]


UPDATE_PIECE = 2**22
"""Elements of one tensor updated per call (Note [Updated in pieces]); a multiple of bitsandbytes' 256-element
blocks."""


def _pieces(numel: int) -> list[slice]:
    return [slice(start, min(start + UPDATE_PIECE, numel)) for start in range(0, numel, UPDATE_PIECE)]


class AdamW8bit(ChunkOptimizer):
    """AdamW with 8-bit block-wise quantized moments, equal to `bitsandbytes.optim.AdamW8bit` on CPU.

    Args:
        lr, betas, eps, weight_decay: as bitsandbytes.optim.AdamW8bit (and torch.optim.AdamW); the defaults are
            theirs.
        min_8bit_size: tensors with fewer elements keep fp32 moments (bitsandbytes' default 4096); 0 quantizes all.
        fp32_embeddings: embedding weights (and heads tied to them) keep fp32 moments, as the Hugging Face Trainer
            arranges for bitsandbytes; False quantizes them too.

    Raises:
        ValueError: a hyperparameter is out of range (all of them are reported at once).
        ImportError: bitsandbytes is not installed.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        fp32_embeddings: bool = True,
    ) -> None:
        errors = adam_errors(lr, betas, eps, weight_decay)
        if min_8bit_size < 0:
            errors.append(f"min_8bit_size={min_8bit_size} must be >= 0")
        if errors:
            raise ValueError("AdamW8bit: " + "; ".join(errors))
        try:
            import bitsandbytes.functional as bnb_functional
        except ImportError as error:
            raise ImportError("AdamW8bit needs bitsandbytes; install it with `pip install bitsandbytes`") from error
        self._bnb: Any = bnb_functional
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.min_8bit_size, self.fp32_embeddings = min_8bit_size, fp32_embeddings
        self._signed_map = bnb_functional.create_dynamic_map(signed=True)  # (256,) fp32 codes of the first moment
        self._unsigned_map = bnb_functional.create_dynamic_map(signed=False)  # (256,) of the second moment

    def state_specs(self, layout: ChunkLayout) -> dict[str, StateSpec]:
        plan = state_plan(layout, self.min_8bit_size, self.fp32_embeddings)
        specs = {}
        if plan.codes_numel:
            blocks = plan.codes_numel // SLOT_ALIGNMENT
            specs |= {
                "exp_avg_codes": StateSpec(plan.codes_numel, torch.uint8),
                "exp_avg_sq_codes": StateSpec(plan.codes_numel, torch.uint8),
                "exp_avg_absmax": StateSpec(blocks, torch.float32),
                "exp_avg_sq_absmax": StateSpec(blocks, torch.float32),
            }
        if plan.full_numel:
            specs |= {
                "exp_avg": StateSpec(plan.full_numel, torch.float32),
                "exp_avg_sq": StateSpec(plan.full_numel, torch.float32),
            }
        return specs

    def step(
        self,
        params: torch.Tensor,
        grads: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        step: int,
        layout: ChunkLayout,
    ) -> None:
        plan = state_plan(layout, self.min_8bit_size, self.fp32_embeddings)
        beta1, beta2 = self.betas
        # Note [Updated in pieces]: bitsandbytes' CPU update makes fp32 copies of the gradient, both moments and
        # more, each the size of the tensor it is given (a 7B head's 131M elements: half a GB each, beside the
        # engine's budget). It is element-wise and its blocks are 256 elements, so pieces of UPDATE_PIECE
        # elements (a multiple of 256) give the same bits with temporaries of a piece's size.
        for slot, region in plan.quantized:
            codes = [region.view(state[name]) for name in ("exp_avg_codes", "exp_avg_sq_codes")]
            absmax = [_absmax(region, state[name]) for name in ("exp_avg_absmax", "exp_avg_sq_absmax")]
            for piece in _pieces(slot.numel):
                blocks = slice(piece.start // SLOT_ALIGNMENT, -(-piece.stop // SLOT_ALIGNMENT))
                self._bnb.optimizer_update_8bit_blockwise(
                    "adam",
                    _flat(slot, grads)[piece],
                    _flat(slot, params)[piece],
                    codes[0][piece],
                    codes[1][piece],
                    beta1,
                    beta2,
                    0.0,  # beta3 and alpha belong to AdEMAMix
                    0.0,
                    self.eps,
                    step,
                    self.lr,
                    self._signed_map,
                    self._unsigned_map,
                    absmax[0][blocks],
                    absmax[1][blocks],
                    weight_decay=self.weight_decay,
                )
        for slot, region in plan.full:
            moments = [region.view(state[name]) for name in ("exp_avg", "exp_avg_sq")]
            for piece in _pieces(slot.numel):
                self._bnb.optimizer_update_32bit(
                    "adam",
                    _flat(slot, grads)[piece],
                    _flat(slot, params)[piece],
                    moments[0][piece],
                    beta1,
                    self.eps,
                    step,
                    self.lr,
                    moments[1][piece],
                    beta2,
                    weight_decay=self.weight_decay,
                )

    def __repr__(self) -> str:
        return (
            f"AdamW8bit(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
            f"min_8bit_size={self.min_8bit_size}, fp32_embeddings={self.fp32_embeddings})"
        )
