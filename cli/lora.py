"""`--lora` / `--qlora`: wrap the meta-device model in peft LoRA adapters before the engine sees it.

The base stays on the meta device: the engine reads its frozen weights straight from the model's safetensors
files (stored NF4 with `--qlora`), so nothing of it is loaded here. Only the adapters are materialised, and
with a seeded init, so the same --seed gives the same adapters and so the same run.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FinetuneError

__all__ = ["ALL_LINEAR", "base_fingerprint", "lora_description", "resolve_targets", "wrap_lora", "wrap_saved_adapter"]

ALL_LINEAR = "all-linear"
"""--lora-targets value for every linear layer except the output layer (attention and MLP projections)."""

_SHOWN_NAMES = 12  # linear layer names listed in an error, at most
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # per weight file, for base_fingerprint


def wrap_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: str, seed: int,
              base_name: str) -> nn.Module:
    """`model` (built on the meta device) wrapped by `peft.get_peft_model`, with its adapters materialised on
    the CPU and initialised by peft's own `reset_lora_parameters` under `seed`.

    Args:
        targets: "all-linear", or comma-separated module names (q_proj,v_proj), matched as peft matches them: a
            module whose full name is the target or ends with "." + the target.
        base_name: what adapter_config.json names as the base (the MODEL as given: a hub id or a path), so
            `AutoPeftModelForCausalLM.from_pretrained(adapter)` can find it.

    Raises:
        FinetuneError: a target matches no module, or a module that is not a linear layer.
    """
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_targets(model, targets),
        task_type=peft.TaskType.CAUSAL_LM,
    )
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base_name
    _materialise_adapters(wrapped, seed)
    return wrapped


def wrap_saved_adapter(model: nn.Module, adapter: Path) -> nn.Module:
    """`model` (on the meta device) wrapped as the peft adapter in `adapter` describes it, its adapters
    materialised (their values are then read from the adapter's file: `Engine.load_adapter`). Trainable, not
    peft's inference mode, so that the engine gives them chunks of their own instead of looking for them in the
    base's files."""
    import peft

    config = peft.PeftConfig.from_pretrained(adapter)
    config.inference_mode = False
    with warnings.catch_warnings():  # as in wrap_lora
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    _materialise_adapters(wrapped, seed=0)
    return wrapped


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """The module names LoRA adapts, checked against `model`: for "all-linear", the names (last part) of its
    linear layers except the output layer; otherwise the comma-separated names, each checked.

    Raises:
        FinetuneError: a name matches no module of `model`, or matches one that is not a linear layer.
    """
    linear = _linear_layers(model)
    linear_names = sorted({name.rsplit(".", 1)[-1] for name in linear})  # q_proj, not model.layers.0.self_attn.q_proj
    if targets.strip() == ALL_LINEAR:
        return linear_names
    names = [name.strip() for name in targets.split(",") if name.strip()]
    modules = dict(model.named_modules())
    for target in names:
        matches = [name for name in modules if name == target or name.endswith(f".{target}")]
        if not matches or any(name not in linear for name in matches):
            problem = "matches no module" if not matches else \
                "matches modules that are not linear layers (or the output layer)"
            raise FinetuneError(
                f"--lora-targets {target!r} {problem} of this model; its linear layers are named "
                f"{_some(linear_names)} (or use --lora-targets {ALL_LINEAR})"
            )
    return names


def _linear_layers(model: nn.Module) -> set[str]:
    """Full names of the modules LoRA can adapt: nn.Linear and transformers' Conv1D (GPT-2's projections),
    except the output layer, whose adapter would cost a vocabulary-sized matrix for little gain."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output}


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _materialise_adapters(model: nn.Module, seed: int) -> None:
    """Give the adapters (created on the meta device next to their meta base layers) real CPU storage, and
    initialise them as peft does (A: Kaiming uniform, B: zeros, so training starts from the base model).

    The global RNG is forked, so the run's own seeding (data order, dropout) is untouched by this.
    """
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    module.lora_A[adapter].to_empty(device="cpu")
                    module.lora_B[adapter].to_empty(device="cpu")
                    module.reset_lora_parameters(adapter, True)


def lora_description(model: Any, qlora: bool) -> str:
    """'LoRA rank 16 on down_proj, q_proj, ...', for the line that says what is about to run."""
    config = model.peft_config[model.active_adapter]
    return f"{'QLoRA' if qlora else 'LoRA'} rank {config.r} on {', '.join(sorted(config.target_modules))}"


def base_fingerprint(model_dir: Path) -> str:
    """A hash of the base model's weight files: each one's size and 16 evenly spaced 4 KiB samples of it.

    A LoRA checkpoint holds the adapters but not the base they were trained on, and a resumed run may point
    MODEL at a moved copy. A different fine-tune of the same architecture has the same tensor names and shapes,
    so only the bytes tell it apart; samples of every file do, in milliseconds where hashing 100 GB would take
    minutes.
    """
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with file.open("rb") as handle:
            for i in range(_SAMPLES):
                handle.seek(size * i // _SAMPLES)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()
