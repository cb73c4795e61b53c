"""Tiny, deterministic causal LMs for tests, built from configs (no hub access).

The set covers the module layouts the offload engine must handle: Llama-style
``model.layers``, GPT-2's ``transformer.h``, GPT-NeoX's ``gpt_neox.layers`` and
OPT's ``model.decoder.layers``, with both tied and untied LM heads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2", "opt", "gpt_neox", "phi3")

HIDDEN = 32
LAYERS = 2
HEADS = 4
VOCAB = 128
MAX_POSITIONS = 128

# Token ids inside the tiny vocabulary: the real defaults (e.g. GPT-2's 50256)
# would index past it.
_TOKEN_IDS: dict[str, int] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Defaults: tied for gpt2, opt and qwen2, untied for llama, mistral,
# gpt_neox and phi3, so both kinds of head are always exercised.
_TIED_BY_DEFAULT: dict[str, bool] = {
    "llama": False,
    "qwen2": True,
    "mistral": False,
    "gpt2": True,
    "opt": True,
    "gpt_neox": False,
    "phi3": False,
}

_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS // 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
}

_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, _LLAMA_LIKE),
    "qwen2": (Qwen2Config, _LLAMA_LIKE),
    "mistral": (MistralConfig, _LLAMA_LIKE),
    "phi3": (Phi3Config, {**_LLAMA_LIKE, "original_max_position_embeddings": MAX_POSITIONS}),
    "gpt2": (
        GPT2Config,
        {
            "n_embd": HIDDEN,
            "n_inner": 2 * HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "vocab_size": VOCAB,
            "n_positions": MAX_POSITIONS,
        },
    ),
    "opt": (
        OPTConfig,
        {
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "vocab_size": VOCAB,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        {
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "vocab_size": VOCAB,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
}


def tiny_config(
    arch: str, *, tie_word_embeddings: bool | None = None, **overrides: Any
) -> PretrainedConfig:
    """A 2-layer config for ``arch`` with every dropout off, so runs are
    deterministic and comparable; pass e.g. ``dropout=0.1`` to turn one on."""
    config_class, sizes = _CONFIGS[arch]
    tied = _TIED_BY_DEFAULT[arch] if tie_word_embeddings is None else tie_word_embeddings
    settings = {**sizes, **_TOKEN_IDS, **_no_dropout(config_class), **overrides}
    return config_class(tie_word_embeddings=tied, **settings)


def save_tiny_model(arch: str, directory: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a seeded float32 checkpoint (safetensors), as a pretrained model
    on disk would be, for code that loads from a path."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def random_batch(
    vocab_size: int,
    *,
    batch: int = 2,
    seq: int = 16,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A language-modelling batch: labels equal the inputs because the model
    shifts them itself."""
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }


def _no_dropout(config_class: type[PretrainedConfig]) -> dict[str, float]:
    """Zero every dropout field the config declares (``*dropout``, ``*pdrop``,
    ``layerdrop``) without listing them per architecture."""
    return {
        field.name: 0.0
        for field in dataclasses.fields(config_class)
        if field.name.endswith(("dropout", "pdrop", "layerdrop"))
    }
