"""`finetune generate` and `finetune chat`: try a model, or a run's result, where it lives: through the engine.

A model larger than memory cannot be loaded by `from_pretrained` to try it. Here it is built on the meta device
and streamed as training streams it (offload/generation.py): its weights stay in their safetensors files and each
block is read in, within the budget, when a decoding step's forward reaches it. The KV cache of the longest
context is taken out of the budget first. A LoRA run's adapter rides on the streamed base (NF4 for a QLoRA run,
as it was trained).

What MODEL_OR_RUN may be: a model directory or hub id; a run directory (its OUTPUT/final/, else its latest
checkpoint, which must be portable); a checkpoint directory; a peft adapter directory (its base is the one its
adapter_config.json names, or --base).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml
from transformers import TextStreamer

from .. import optim
from ..offload import (
    Engine,
    default_compute_dtype,
    freeze_for_generation,
    kv_cache_bytes,
    swap_references,
    without_kv_cache,
)
from .checkpoints import MANIFEST, RUN_CONFIG, Checkpoints
from .config import Dtype
from .errors import FinetuneError, one_line
from .export import is_adapter
from .generation_options import Decoding, GenerateOptions
from .hardware import run_budget
from .lora import wrap_saved_adapter
from .model import build_meta_model, load_tokenizer, resolve_model

__all__ = ["Source", "chat", "generate", "resolve_source", "streamed_model"]

FINAL = "final"  # a run's OUTPUT/final/ (cli/train.py writes it)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class Source:
    """What MODEL_OR_RUN names, resolved to files."""

    model_dir: Path
    """The Hugging Face model whose safetensors hold the (base) weights."""
    adapter: Path | None
    """A peft adapter directory to put on the base (a LoRA run), or None."""
    tokenizer: Path | str
    qlora: bool
    """The base stored as NF4, as a QLoRA run trained it."""


def resolve_source(text: str, options: GenerateOptions) -> Source:
    """Raises FinetuneError: nothing usable at `text`, with what would be."""
    path = Path(text).expanduser()
    run_config = _run_config(path) if path.is_dir() else {}
    target = _run_target(path) if run_config or (path / "checkpoints" / MANIFEST).exists() else path
    if target.is_dir() and is_adapter(target):
        base_name = str(options.base) if options.base else _adapter_base(target)
        model_dir = resolve_model(base_name, trust_remote_code=options.trust_remote_code)
        adapter: Path | None = target
    else:
        model_dir = resolve_model(str(target), trust_remote_code=options.trust_remote_code)
        adapter = None
    tokenizer = options.tokenizer or next((d for d in (target, model_dir) if _has_tokenizer(d)), model_dir)
    return Source(model_dir, adapter, tokenizer, qlora=bool(run_config.get("qlora")) and adapter is not None)


def _run_config(path: Path) -> dict[str, Any]:
    """The run's saved options (qlora), or {} for a directory that is not a run."""
    for candidate in (path / RUN_CONFIG, path.parent / RUN_CONFIG):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _run_target(run: Path) -> Path:
    """A run's final model, else its latest checkpoint if that holds the model (portable)."""
    if (run / FINAL).is_dir():
        return run / FINAL
    if not (run / "checkpoints" / MANIFEST).exists():
        return run  # a checkpoint directory (its run-config.yaml sits inside it)
    checkpoints = Checkpoints(run)
    latest = checkpoints.path(checkpoints.latest())
    if swap_references(latest) is not None:
        raise FinetuneError(
            f"run {run} has no final model yet and its latest checkpoint {latest} keeps its state in the run's swap "
            f"files; finish the run (finetune run --resume --output {run}), or train with --portable-checkpoints"
        )
    return latest


def _adapter_base(adapter: Path) -> str:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"adapter {adapter} does not name its base model; pass --base MODEL_DIR")
    return str(base)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


@contextmanager
def streamed_model(source: Source, options: GenerateOptions, context_tokens: int) -> Iterator[Any]:
    """An Engine over `source`'s model, ready to `generate` with a KV cache of `context_tokens` positions.

    The weights are frozen (read from their files, no optimizer state); the engine still takes an optimizer,
    which no step uses. Raises FinetuneError: a budget that cannot hold the model's minimum and the cache."""
    model = build_meta_model(source.model_dir, trust_remote_code=options.trust_remote_code)
    if source.adapter is not None:
        model = wrap_saved_adapter(model, source.adapter)
    freeze_for_generation(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_compute_dtype(device, zeroth_order=False) if options.dtype is Dtype.AUTO else \
        getattr(torch, options.dtype.value)
    quantize = "nf4" if source.qlora else None
    optimizer = optim.AdamW()
    need_device, need_host = Engine.minimum_budget(model, optimizer, compute_dtype=dtype, quantize_frozen=quantize)
    cache = kv_cache_bytes(model.config, context_tokens, 1, dtype)
    budget = without_kv_cache(run_budget(options, need_device + cache, need_host), cache, device)
    try:
        engine = Engine(model, optimizer, budget, compute_dtype=dtype, weights=source.model_dir,
                        quantize_frozen=quantize, device=device)
    except ValueError as error:
        raise FinetuneError(f"cannot stream {source.model_dir}: {one_line(str(error))}") from None
    with engine:
        if source.adapter is not None:
            engine.load_adapter(source.adapter)
        yield engine


def context_limit(model_dir: Path) -> int | None:
    """The model's longest context (max_position_embeddings), if its config says."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    value = text.get("max_position_embeddings") or text.get("n_positions")
    return int(value) if value else None


def _check_context(tokens: int, limit: int | None, what: str) -> None:
    if limit is not None and tokens > limit:
        raise FinetuneError(f"{what} is {tokens} tokens, beyond the model's context of {limit}; shorten the prompt "
                            "or lower --max-new-tokens")


def _print_tokens(tokenizer: Any, out: TextIO) -> Any:
    """A streamer that writes each piece of decoded text as it comes (transformers' TextStreamer, to `out`)."""
    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _decode(engine: Any, tokenizer: Any, ids: Any, decoding: Decoding, out: TextIO | None) -> dict[str, Any]:
    """Generate after `ids` (1 x prompt tokens); the new tokens, their text and the rate."""
    torch.manual_seed(decoding.seed)
    started = time.perf_counter()
    result = engine.generate(ids, generation_config=decoding.generation_config(tokenizer),
                             streamer=_print_tokens(tokenizer, out) if out is not None else None)
    seconds = time.perf_counter() - started
    new = result[0, ids.shape[1]:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new, "new_tokens": len(new),
            "seconds": seconds, "tokens_per_s": len(new) / seconds if seconds else 0.0}


def generate(source_text: str, prompt: str, decoding: Decoding, options: GenerateOptions, *, chat_template: bool,
             out: TextIO | None) -> dict[str, Any]:
    """Complete `prompt` (as a user turn of the chat template with `chat_template`), streaming the text to `out`
    (None: silent); returns the result with the peak memory of the process."""
    source = resolve_source(source_text, options)
    tokenizer = load_tokenizer(source.tokenizer, trust_remote_code=options.trust_remote_code)
    ids = _chat_ids(tokenizer, [{"role": "user", "content": prompt}]) if chat_template else \
        tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise FinetuneError("--prompt is empty after tokenization; give some text")
    total = ids.shape[1] + decoding.max_new_tokens
    _check_context(total, context_limit(source.model_dir), "the prompt plus --max-new-tokens")
    with streamed_model(source, options, options.context_tokens or total) as engine:
        result = _decode(engine, tokenizer, ids, decoding, out)
        stats = engine.stats()
    return {"model": str(source.model_dir), "adapter": str(source.adapter) if source.adapter else None,
            "prompt_tokens": int(ids.shape[1]), **result, "peak_rss": _peak_rss(),
            "peak_device": stats["peak_device"], "peak_host": stats["peak_host"], "nvme_read": stats["bytes_read"]}


def chat(source_text: str, decoding: Decoding, options: GenerateOptions, *, lines: Iterable[str], out: TextIO,
         prompt_to: TextIO | None) -> int:
    """A conversation: each line of `lines` is a user turn, answered through the chat template and streamed to
    `out`. `/reset` forgets the conversation, `/exit` (or the end of input) ends it. The oldest turns are dropped
    when the conversation outgrows the context (--context-tokens). Returns the number of replies."""
    source = resolve_source(source_text, options)
    tokenizer = load_tokenizer(source.tokenizer, trust_remote_code=options.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(f"the tokenizer of {source_text} has no chat template; use finetune generate, or pass "
                            "--tokenizer with one that has")
    limit = context_limit(source.model_dir)
    context = options.context_tokens or min(limit or 2048, 2048)
    _check_context(context, limit, "--context-tokens")
    if context <= decoding.max_new_tokens:
        raise FinetuneError(f"--context-tokens {context} leaves no room for a prompt beside --max-new-tokens "
                            f"{decoding.max_new_tokens}; raise it or lower --max-new-tokens")
    messages: list[dict[str, str]] = []
    replies = 0
    with streamed_model(source, options, context) as engine:
        for line in _turns(lines, prompt_to):
            if line == "/exit":
                break
            if line == "/reset":
                messages.clear()
                out.write("(conversation reset)\n")
                continue
            messages.append({"role": "user", "content": line})
            ids = _fit(tokenizer, messages, context - decoding.max_new_tokens)
            if ids is None:
                messages.pop()
                out.write(f"(that message is longer than the context of {context} tokens; send a shorter one)\n")
                continue
            reply = _decode(engine, tokenizer, ids, decoding, out)
            messages.append({"role": "assistant", "content": reply["text"]})
            replies += 1
    return replies


def _turns(lines: Iterable[str], prompt_to: TextIO | None) -> Iterator[str]:
    """The non-empty user turns, with a '> ' prompt before each where a person types them."""
    iterator = iter(lines)
    while True:
        if prompt_to is not None:
            prompt_to.write("> ")
            prompt_to.flush()
        line = next(iterator, None)
        if line is None:
            return
        if line.strip():
            yield line.strip()


def _fit(tokenizer: Any, messages: list[dict[str, str]], room: int) -> Any:
    """The conversation's prompt ids within `room` tokens, dropping its oldest turns (in place) as needed; None
    when the last user turn alone does not fit."""
    while True:
        ids = _chat_ids(tokenizer, messages)
        if ids.shape[1] <= room:
            return ids
        if len(messages) <= 1:
            return None
        del messages[:2]  # the oldest user turn and its reply


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError("--chat-template: the tokenizer has no chat template; drop --chat-template, or pass "
                            "--tokenizer with one that has")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]


def _peak_rss() -> int:
    """The process's peak resident memory in bytes (Linux reports kilobytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
