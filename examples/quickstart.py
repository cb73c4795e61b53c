"""Fine-tune a small Llama on the Python standard library's source, with its state streamed through NVMe.

    python examples/quickstart.py            # about a minute on 2 CPU cores

Bytes are the tokens (vocabulary 256), so no tokenizer or download is needed: every machine with Python has
this corpus. The budget is set below the training state, so weights, gradients and AdamW moments really
travel to the swap directory and back. At the end the model is exported and loaded back with transformers.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from finetune import offload, optim


def corpus_bytes(limit: int) -> torch.Tensor:
    """The first `limit` bytes of the standard library's .py files, as a 1-D tensor of token ids."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - seq, (batch,), generator=generator)
        ids = torch.stack([tokens[s : s + seq] for s in starts])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="finetune-quickstart-"))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")

    tokens = corpus_bytes(2_000_000)
    split = int(len(tokens) * 0.95)
    generator = torch.Generator().manual_seed(0)
    train, held_out = batches(tokens[:split], 8, 128, generator), batches(tokens[split:], 8, 128, generator)
    eval_batch = next(held_out)

    adamw = optim.AdamW(lr=2e-3, weight_decay=0.0)
    budget = offload.Budget(device="4MB", host="4MB", nvme=work / "swap")
    with offload.Engine.from_pretrained(work / "base", adamw, budget, max_grad_norm=1.0) as engine:
        print(f"eval loss before: {engine.eval_loss(eval_batch):.3f}")
        for step in range(1, args.steps + 1):
            loss = engine.train_step(next(train))
            if step % 10 == 0 or step == 1:
                print(f"step {step:3d}  loss {loss:.3f}")
        print(f"eval loss after:  {engine.eval_loss(eval_batch):.3f}")
        stats = engine.stats()
        read, written = stats["bytes_read"] / 2**20, stats["bytes_written"] / 2**20
        print(f"NVMe traffic: {read:.0f} MiB read, {written:.0f} MiB written")
        engine.export(work / "finetuned")

    reloaded = AutoModelForCausalLM.from_pretrained(work / "finetuned")
    with torch.no_grad():
        print(f"reloaded with transformers, eval loss: {reloaded(**eval_batch).loss.item():.3f}")
    print(f"model written to {work / 'finetuned'}")


if __name__ == "__main__":
    main()
