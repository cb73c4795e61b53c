"""MODEL: find the directory, check it is a causal LM the engine can stream, and load its tokenizer.

Every check runs on the meta device (shapes only, no weights read), so a 70B model is refused in a second,
with the reason, instead of after minutes of loading. The safetensors files are checked from their headers
alone (whole, undamaged, each tensor the shape config.json gives it) for the same reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..offload import DamagedSafetensors, UnsupportedDtype, meta_model, read_header
from .errors import FinetuneError, one_line

__all__ = ["build_meta_model", "check_weights", "has_safetensors", "load_tokenizer", "pad_id", "resolve_model",
           "stored_dtype"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def resolve_model(source: str, *, trust_remote_code: bool = False, weights: bool = True) -> Path:
    """A local model directory for `source`: the path itself, or a hub id's download.

    `weights=False` accepts a directory with only config.json: `finetune plan` needs shapes, not weights.

    Raises:
        FinetuneError: missing, unreadable or incomplete directory; a hub id that cannot be downloaded.
    """
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
            raise FinetuneError(f"model path {source} does not exist; pass a Hugging Face model directory or hub id")
        path = _download(source, trust_remote_code)
    _check_directory(path, weights)
    return path


def _download(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = _HUB_FILES + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated: the way out is the same
        local = f"./{repo_id.split('/')[-1]}"
        raise FinetuneError(
            f"model {repo_id} is not a local directory and could not be downloaded from the hub "
            f"({type(error).__name__}); where the network allows, run "
            f"`hf download {repo_id} --local-dir {local}` and pass {local}"
        ) from None


def _check_directory(path: Path, weights: bool = True) -> None:
    if not path.is_dir():
        raise FinetuneError(f"model path {path} is a file; pass the directory that holds its config.json")
    if not os.access(path, os.R_OK | os.X_OK):
        raise FinetuneError(f"model directory {path} is not readable (permission denied); fix its permissions")
    config = path / "config.json"
    if not config.exists():
        raise FinetuneError(
            f"model directory {path} has no config.json; a Hugging Face model directory holds config.json and "
            "*.safetensors weights (save_pretrained writes both)"
        )
    try:
        settings = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FinetuneError(f"cannot read {config}: {one_line(str(error))}; restore the file") from None
    if not isinstance(settings, dict):  # transformers would fail on it with an AttributeError deep inside
        raise FinetuneError(f"{config} holds a JSON {_JSON_TYPES.get(type(settings), 'value')}, not an object of "
                            "settings; restore the file (save_pretrained writes it)")
    if weights and not has_safetensors(path):
        found = "only PyTorch .bin weights" if any(path.glob("*.bin")) else "no weights"
        raise FinetuneError(
            f"model directory {path} has {found}; it needs model.safetensors (or a sharded index): "
            "convert with AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
        )


def has_safetensors(directory: Path) -> bool:
    """Whether `directory` holds safetensors weights (one file or a sharded index)."""
    return (directory / "model.safetensors").exists() or (directory / "model.safetensors.index.json").exists()


def build_meta_model(directory: Path, *, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device (no memory), with tied weights tied as Engine.from_pretrained does.

    Raises:
        FinetuneError: a model type transformers does not know, custom code without --trust-remote-code, a
            model that is not a causal LM, or safetensors files that do not hold its weights (`check_weights`).
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as error:
        message = one_line(str(error))
        if "trust_remote_code" in message:
            raise FinetuneError(
                f"model {directory} ships its own code; pass --trust-remote-code if you trust it"
            ) from None
        model_type = _model_type(directory)
        raise FinetuneError(
            f"model {directory}: architecture {model_type!r} is not supported by transformers "
            f"{transformers.__version__}; upgrade transformers, or pass --trust-remote-code if the model ships its "
            f"code"
        ) from None
    try:
        model = meta_model(config, trust_remote_code=trust_remote_code)
    except ValueError:
        raise FinetuneError(
            f"model {directory} is a {config.model_type!r} model, which is not a causal language model; finetune "
            "trains models that AutoModelForCausalLM loads"
        ) from None
    if has_safetensors(directory):  # `finetune plan` accepts a directory with config.json alone
        check_weights(directory, model)
    return model


def check_weights(directory: Path, model: nn.Module) -> None:
    """Check `directory`'s safetensors files against `model` (on the meta device) from their headers alone: each
    file whole, each tensor the shape the config gives it. The engine reads the weights only once the run has
    started; a damaged file must be refused before that, with its name.

    Raises:
        FinetuneError: a missing shard, a damaged header, a file cut short, or a tensor of another shape.
    """
    stored: dict[str, tuple[Path, list[int]]] = {}
    for path in _weight_files(directory):
        stored.update({name: (path, shape) for name, shape in _tensor_shapes(path).items()})
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied weights under each name
        path, shape = stored.get(name, (None, None))
        if shape is not None and shape != list(parameter.shape):
            raise FinetuneError(
                f"{path}: tensor {name} has shape {shape}, but {directory / 'config.json'} makes it "
                f"{list(parameter.shape)}; the weights and config.json are from different models: use the "
                "config.json saved with these weights"
            )


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of `directory`: the shards its index names (as the engine reads it), or the one
    model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return [directory / "model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / file for file in dict.fromkeys(weight_map.values())]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise FinetuneError(f"cannot read {index} ({type(error).__name__}: {one_line(str(error))[:120]}); download "
                            "or save the weights again") from None
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise FinetuneError(f"{index} names {', '.join(missing)}, which {directory} does not hold; download or save "
                            "the weights again")
    return files


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the header of one safetensors file (which `read_header` checks is whole).

    Raises:
        FinetuneError: the header is damaged, the file ends before its last tensor, or a dtype finetune cannot read.
    """
    try:
        return {name: list(tensor.shape) for name, tensor in read_header(path).items()}
    except DamagedSafetensors as error:
        raise FinetuneError(str(error)) from None
    except UnsupportedDtype as error:
        raise FinetuneError(f"{error}; save the model in bfloat16 or float32 first") from None


def _model_type(directory: Path) -> str:
    try:
        return str(json.loads((directory / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError):
        return "unknown"


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in `source` (a directory or hub id).

    Raises:
        FinetuneError: no tokenizer there; says to pass --tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise FinetuneError(
            f"no usable tokenizer in {source} ({one_line(str(error))[:160]}); pass --tokenizer with a tokenizer "
            "directory or hub id"
        ) from None


def pad_id(tokenizer: Any) -> int:
    """The id padding uses; any id works, since padding is masked out of attention and loss."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's safetensors, as its config.json says: what a frozen base is read in, and what the
    run's final model is written in."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
