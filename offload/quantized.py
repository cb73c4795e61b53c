"""Frozen weights stored as 4-bit NF4 (QLoRA): a quarter of the bytes in every tier and on every read.

A quantized frozen chunk is one uint8 buffer. Each nn.Linear weight of a decoder layer is stored as
bitsandbytes' block-wise NF4 (two 4-bit codes a byte, one float32 absmax per 64 values, no double
quantization: the settings of transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`),
so a model quantized here computes with the same weights as one loaded that way. The other frozen tensors
(norms, biases) keep their bytes in the compute dtype. The chunk streams through the tiers like any other;
when its layer computes, the engine dequantizes it into a compute-dtype buffer, the layer's weights for that
hold, as bitsandbytes' Linear4bit dequantizes its weight on every forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optim.layout import ChunkLayout, chunk_nbytes

__all__ = ["QUANTIZATIONS", "QuantizedLayout", "quantizable_weights"]

QUANTIZATIONS = ("nf4",)
_BLOCK = 64  # values per absmax: bitsandbytes' and transformers' default for 4-bit
_ALIGN = 64  # bytes: every part starts aligned, so absmax can be viewed as float32 in place
DEQUANTIZE_PIECE = 2**22
"""Values dequantized per call (`QuantizedLayout.dequantize_into`): whole blocks of 64, an even count (two codes
a byte)."""


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:
        raise ValueError(
            f"quantize_frozen='nf4' needs bitsandbytes ({error}); pip install bitsandbytes, or train without it"
        ) from None
    return functional


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Part:
    """Where one frozen tensor is in the chunk: its codes and absmax, or (not quantized) its raw bytes."""

    offset: int
    nbytes: int  # codes, or the raw bytes
    absmax_offset: int | None  # None: stored raw in the compute dtype

    @property
    def quantized(self) -> bool:
        return self.absmax_offset is not None


class QuantizedLayout:
    """The byte layout of a quantized frozen chunk, beside the element layout (`layout`) of its
    dequantized form, which is what the layer's parameters view while it computes."""

    def __init__(self, layout: ChunkLayout, quantize: frozenset[str], dtype: torch.dtype) -> None:
        self.layout, self.dtype = layout, dtype
        parts, offset = [], 0
        for slot in layout.slots:
            if slot.name in quantize:
                codes, absmax = (slot.numel + 1) // 2, -(-slot.numel // _BLOCK) * 4
                parts.append(_Part(offset, codes, offset + _aligned(codes)))
                offset += _aligned(codes) + _aligned(absmax)
            else:
                raw = slot.numel * dtype.itemsize
                parts.append(_Part(offset, raw, None))
                offset += _aligned(raw)
        self.parts: list[_Part] = parts
        self.nbytes = chunk_nbytes(offset, torch.uint8)

    def quantize_into(self, buffer: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Fill the uint8 `buffer` from the frozen tensors (in slot order), quantizing in the compute dtype,
        as a model loaded in that dtype is quantized."""
        functional = _bitsandbytes()
        for slot, part, tensor in zip(self.layout.slots, self.parts, tensors, strict=True):
            values = tensor.to(self.dtype).reshape(slot.shape)
            if not part.quantized:
                buffer[part.offset : part.offset + part.nbytes].copy_(values.reshape(-1).view(torch.uint8))
                continue
            codes, state = functional.quantize_4bit(values, blocksize=_BLOCK, quant_type="nf4")
            buffer[part.offset : part.offset + part.nbytes].copy_(codes.reshape(-1))
            self._absmax(buffer, part, slot.numel).copy_(state.absmax)

    def dequantize_into(self, buffer: torch.Tensor, flat: torch.Tensor) -> None:
        """Write the weights of the uint8 `buffer` into `flat`, a compute-dtype buffer of `layout`.

        bitsandbytes has no CPU `out=` and its CPU dequantization makes temporaries the size of what it is given
        (a 13B MLP weight's fp32 copy is 283 MB, beside the budget), so each tensor goes in pieces of
        DEQUANTIZE_PIECE values: every value is its code's level times its block's absmax, so pieces of whole
        blocks give the same bits. Each piece is given as one row (shape [n]), never as the tensor's own shape:
        bitsandbytes' CPU AVX-512 kernel (0.49 and later) takes a row's absmax as if every row began a block, wrong
        for rows not a multiple of 64 values; for one row it is the flat block indexing NF4 is defined by."""
        functional = _bitsandbytes()
        code = functional.get_4bit_type("nf4", device=buffer.device)
        for slot, part, view in zip(self.layout.slots, self.parts, self.layout.views(flat)):
            stored = buffer[part.offset : part.offset + part.nbytes]
            if not part.quantized:
                view.copy_(stored.view(self.dtype).view(slot.shape))
                continue
            absmax, out = self._absmax(buffer, part, slot.numel), view.view(-1)
            for start in range(0, slot.numel, DEQUANTIZE_PIECE):
                stop = min(start + DEQUANTIZE_PIECE, slot.numel)
                state = functional.QuantState(
                    absmax=absmax[start // _BLOCK : -(-stop // _BLOCK)], shape=torch.Size([stop - start]), code=code,
                    blocksize=_BLOCK, quant_type="nf4", dtype=self.dtype,
                )
                codes = stored[start // 2 : (stop + 1) // 2]
                out[start:stop].copy_(functional.dequantize_4bit(codes.view(-1, 1), state).view(-1))

    @staticmethod
    def _absmax(buffer: torch.Tensor, part: _Part, numel: int) -> torch.Tensor:
        count = -(-numel // _BLOCK)
        return buffer[part.absmax_offset : part.absmax_offset + 4 * count].view(torch.float32)


def quantizable_weights(model: nn.Module, names: list[str]) -> frozenset[str]:
    """The names among `names` that are the weight of an nn.Linear: what transformers' 4-bit loading quantizes
    in a decoder layer. (GPT-2's Conv1D projections are not nn.Linear and stay in the compute dtype.)"""
    chosen = []
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear):
            chosen.append(name)
    return frozenset(chosen)
