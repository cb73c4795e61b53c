"""The files of a checkpoint directory, which is complete or absent, never half written.

A checkpoint is an ordinary Hugging Face model directory (config + safetensors shards of the fp32 master
weights, so `from_pretrained` and `finetune export` read it as a model), plus the optimizer's state chunks in
`optimizer*.safetensors` and the engine's small state in `engine_state.pt`. A peft model whose base is read
from its own files checkpoints only its adapter (a peft adapter directory) in place of the model. It is written
with `durable.atomic_directory`: under a temporary name next to its final place, every file and the directory
fsynced, and only then renamed, so a crash or a full disk at any point leaves the previous checkpoints as they
were and at most a `.partial` directory.
"""

from __future__ import annotations

# engine.py imports atomic_directory from here; it lives in durable.py now (drop this once engine.py imports it there)
from .durable import atomic_directory  # noqa: F401

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ENGINE_STATE_FILE", "FORMAT_VERSION", "OPTIMIZER_PREFIX"]

ENGINE_STATE_FILE = "engine_state.pt"
# The files of a peft adapter directory (PeftModel.save_pretrained): its LoraConfig and its weights.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_PREFIX = "optimizer"
FORMAT_VERSION = 1
