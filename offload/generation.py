"""What generating through the engine needs beyond training: a model whose weights stay in their files, and room
for the KV cache inside the budget.

Decoding runs the model's own `generate` (transformers), with each block held while its forward runs and released
after, exactly as `eval_loss` streams them: a model larger than memory decodes one block at a time per new token.
The weights are frozen for it, so they are read from the model's safetensors whenever their block is loaded and
no optimizer state or swap file is made for them. The KV cache is not in any chunk: it grows on the compute device
as tokens come, so its bytes at the longest context are taken out of the device tier before the engine is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .budget import Budget
from .model_export import is_peft

__all__ = ["freeze_for_generation", "kv_cache_bytes", "without_kv_cache"]


def kv_cache_bytes(config: Any, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the keys and values of `tokens` positions (prompt and new tokens) for `batch` sequences: two
    tensors per layer of KV heads x head dim each, as transformers' DynamicCache holds them."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * tokens * batch * dtype.itemsize


def without_kv_cache(budget: Budget, kv_bytes: int, device: torch.device) -> Budget:
    """`budget` with `kv_bytes` taken from its device tier, where the cache lives (the machine's default device
    budget when none was given), so that the blocks and the cache together stay within what was given.

    Raises:
        ValueError: the device tier is not larger than the cache.
    """
    device_bytes, _ = budget.resolved(device)
    if device_bytes <= kv_bytes:
        raise ValueError(f"the KV cache needs {kv_bytes} bytes but the device budget is {device_bytes} bytes")
    return Budget(device=device_bytes - kv_bytes, host=budget.host, nvme=budget.nvme)


def freeze_for_generation(model: nn.Module) -> nn.Module:
    """Freeze every parameter the model's files hold, so the engine reads them from those files and keeps no
    optimizer state for them. A peft model is left as peft made it: its base is frozen already, and its adapters,
    which are not in the base's files, stay trainable so that they get chunks (`Engine.load_adapter` fills them)."""
    if not is_peft(model):
        model.requires_grad_(False)
    return model
