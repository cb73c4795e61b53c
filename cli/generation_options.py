"""The options of `finetune generate` and `finetune chat`, apart from the code that runs them (cli/generate.py),
so that building the commands' --help imports no torch: how tokens are chosen (`Decoding`) and where the model
runs (`GenerateOptions`). Each field's docstring is its --help text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, Dtype

__all__ = ["Decoding", "GenerateOptions"]


@dataclass(frozen=True)
class Decoding:
    """How new tokens are chosen. Temperature 0 is greedy decoding (the argmax at each step, deterministic)."""

    max_new_tokens: int = 128
    """Tokens to generate at most (fewer when the model ends its text: EOS)."""

    temperature: float = 0.0
    """0: greedy (the likeliest token each step, deterministic); above 0: sampling, flatter as it grows."""

    top_p: float = 1.0
    """With --temperature: sample from the likeliest tokens whose probabilities add up to this (nucleus)."""

    top_k: int = 0
    """With --temperature: sample from the k likeliest tokens only (0: no limit)."""

    seed: int = 0
    """Seed of the sampling."""

    def __post_init__(self) -> None:
        errors = []
        if self.max_new_tokens < 1:
            errors.append(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            errors.append(f"--temperature {self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            errors.append(f"--top-p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            errors.append(f"--top-k {self.top_k} must be >= 0 (0: no limit)")
        if errors:
            raise ConfigError("; ".join(errors))

    def generation_config(self, tokenizer: Any) -> Any:
        """A transformers GenerationConfig of these settings alone: a model's generation_config.json may ask for
        sampling by default, and what the flags say must be what runs."""
        from transformers import GenerationConfig

        from .model import pad_id

        sample = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sample,
            temperature=self.temperature if sample else None, top_p=self.top_p if sample else None,
            top_k=(self.top_k or None) if sample else None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer), bos_token_id=tokenizer.bos_token_id,
        )


@dataclass(frozen=True)
class GenerateOptions:
    """Where the model runs: the memory flags (as `run`'s), the compute dtype, and the context the KV cache is
    sized for."""

    memory: str | None = None
    """RAM/VRAM for the device and host tiers together, e.g. 8GB, as `run --memory` (the KV cache comes out of the
    device tier). Default: taken from the machine."""

    device_memory: str | None = None
    """Bytes for the device tier (GPU memory on CUDA). Overrides its share of --memory."""

    host_memory: str | None = None
    """Bytes for the host tier (RAM). Overrides its share of --memory."""

    nvme: str | None = None
    """Swap directory. Generation writes none (the weights are read from their files); accepted for symmetry with
    run."""

    dtype: Dtype = Dtype.AUTO
    """Compute dtype: auto is bfloat16 on CUDA and float32 on CPU."""

    context_tokens: int | None = None
    """Tokens of context the KV cache is sized for. Default: the prompt plus --max-new-tokens (generate), 2048 or
    the model's context if shorter (chat: older turns are dropped beyond it)."""

    base: Path | None = None
    """For an adapter (a LoRA run): the base model directory, instead of the one its adapter_config.json names."""

    tokenizer: str | None = None
    """Tokenizer directory or hub id, when the model or run has none."""

    trust_remote_code: bool = False
    """Run the model's own Python code from its directory. Only for models you trust."""

    def __post_init__(self) -> None:
        if self.context_tokens is not None and self.context_tokens < 2:
            raise ConfigError(f"--context-tokens {self.context_tokens} must be >= 2")
