"""Fine-tune a small Llama on the Python standard library's source with `finetune run`, then export it.

    python examples/finetune_stdlib.py                  # about two minutes on 2 CPU cores
    python examples/finetune_stdlib.py --steps 300 --work-dir ./stdlib-run

Every machine with Python has this corpus, so nothing is downloaded. The script:

1. turns the standard library's .py files into a jsonl dataset ({"text": ...} per file),
2. trains a small byte-level BPE tokenizer on it with `tokenizers`,
3. builds a tiny Llama from `LlamaConfig` and saves it, with the tokenizer, as a Hugging Face model directory,
4. runs `finetune run` on it, with the budget below the training state so the state streams through NVMe
   files, a held-out validation split and checkpoints, and
5. exports the last checkpoint with `finetune export` and reloads it with transformers.

The tests build their tiny models with `train_tokenizer` and `save_tiny_llama` from this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_dataset(path: Path, *, limit_bytes: int) -> Path:
    """Write the first `limit_bytes` of the standard library's .py files as jsonl, one {"text": source} per file."""
    total = 0
    with path.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = source.read_text(errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= limit_bytes:
                break
    return path


def train_tokenizer(texts: Iterable[str], directory: Path, *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with <s>, </s>, <pad> and a chat template, saved to
    `directory`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    return wrapped


def save_tiny_llama(directory: Path, tokenizer: PreTrainedTokenizerFast, *, hidden: int, layers: int,
                    seed: int = 0) -> Path:
    """A randomly initialised Llama sized to `tokenizer`, saved (float32 safetensors) next to it."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


def finetune(*args: str) -> None:
    """Run the installed `finetune` command (the one next to this Python); stop with its exit code on failure
    (its own message has already said why)."""
    command = [str(Path(sys.executable).with_name("finetune")), *args]
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code:
        sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temporary directory")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="finetune-stdlib-"))
    work.mkdir(parents=True, exist_ok=True)
    for previous in ("run", "exported"):  # a fresh run each time
        shutil.rmtree(work / previous, ignore_errors=True)

    data = stdlib_dataset(work / "stdlib.jsonl", limit_bytes=3_000_000)
    texts = (json.loads(line)["text"] for line in data.open())
    tokenizer = train_tokenizer(texts, work / "base", vocab_size=4096)
    save_tiny_llama(work / "base", tokenizer, hidden=128, layers=4)

    finetune(
        "run", str(work / "base"), str(data), "--output", str(work / "run"),
        "--steps", str(args.steps), "--seq-len", "256", "--pack", "--batch-size", "8",
        "--lr", "3e-3", "--warmup-steps", "10", "--val-fraction", "0.02", "--eval-every", "40",
        "--checkpoint-every", "40", "--memory", "20MB", "--nvme", str(work / "swap"),
    )
    finetune("export", str(work / "run"), str(work / "exported"))

    model = AutoModelForCausalLM.from_pretrained(work / "exported")
    tokenizer = AutoTokenizer.from_pretrained(work / "exported")
    prompt = tokenizer("def ", return_tensors="pt")
    with torch.no_grad():
        sample = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("reloaded with transformers; greedy sample:\n" + tokenizer.decode(sample[0]))
    print(f"run directory (metrics.jsonl, loss.png, checkpoints): {work / 'run'}")


if __name__ == "__main__":
    main()
