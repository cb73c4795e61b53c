"""A Hugging Face causal LM built on the meta device: every parameter a shape without memory.

A model larger than RAM can only be trained if it is never whole in memory: the engine builds it here and then
streams its weights from the safetensors files block by block (`Engine(model, ..., weights=dir)`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["meta_model"]


def meta_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """`AutoModelForCausalLM.from_config(config)` on the meta device (buffers stay real: rotary tables and the
    like are computed, not stored), with tied weights tied.

    Raises:
        ValueError: transformers has no causal LM class for `config` (from `from_config`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # meta parameters are not tied by construction: tie them so each is owned once
    return model
