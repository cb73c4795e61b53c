"""The cost model's predictions for the setups of the papers this engine borrows from (Fuyou/LoHan, SlideFormer, ZO2).

    python benchmarks/paper_setups.py            # every setup, each predict in a child process (--timeout s)
    python benchmarks/paper_setups.py --only fuyou-13b

No timing is measured: models are built on the meta device from configs written below, and `offload.predict`
replays one step's chunk traffic on the named hardware profile. Prints a table, writes
benchmarks/results/paper_setups.json and prints the JSON last. A setup whose prediction raises or does not return
within --timeout is reported as such (see docs/planning.md), never dropped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

GiB = 2**30

# name: (architecture, config kwargs). Shapes from the GPT-3 paper (Table 2.1: 13B 40 x 5140 -> 5120 so that
# heads divide it, 175B 96 x 12288), LLaMA-65B (80 x 8192, 64 heads), Llama-2-70B and Mistral-Large-2 (123B).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt3-13b": ("opt", dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=4 * 5120, num_attention_heads=40)),
    "gpt3-65b": ("opt", dict(hidden_size=8192, num_hidden_layers=80, ffn_dim=4 * 8192, num_attention_heads=64)),
    "gpt3-175b": ("opt", dict(hidden_size=12288, num_hidden_layers=96, ffn_dim=4 * 12288, num_attention_heads=96)),
    "llama2-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "mistral-large-123b": ("llama", dict(hidden_size=12288, num_hidden_layers=88, intermediate_size=28672,
                                         num_attention_heads=96, num_key_value_heads=8, vocab_size=32768)),
}

# name: (model, profile, optimizer, batch, seq, what the paper reports for it)
SETUPS: dict[str, tuple[str, str, str, int, int, str]] = {
    "fuyou-13b": ("gpt3-13b", "fuyou-rtx4090", "adamw", 32, 1024,
                  "156 TFLOPS on one RTX 4090 (Fuyou v1 abstract); ZeRO-Infinity 45 TFLOPS"),
    "fuyou-65b": ("gpt3-65b", "fuyou-rtx4090", "adamw", 32, 1024, "trainable; ZeRO-Infinity cannot fit it in <=512 GB"),
    "fuyou-175b": ("gpt3-175b", "fuyou-rtx4090", "adamw", 32, 1024,
                   "trainable on one RTX 4090 (256 GB RAM in LoHan v2); throughput not read"),
    "slideformer-70b": ("llama2-70b", "slideformer-rtx4090", "adamw", 64, 1024, "1.40-6.27x its baselines"),
    "slideformer-123b": ("mistral-large-123b", "slideformer-rtx4090", "adamw", 64, 1024,
                         "trainable on one RTX 4090; >95% of peak TFLOPS kept"),
    "zo2-175b": ("gpt3-175b", "h200-128gb", "mezo", 1, 2048, "18.04 GB GPU memory (ZO2 README table)"),
    "zo2-175b-bf16": ("gpt3-175b", "h200-128gb", "mezo-bf16", 1, 2048,
                      "18.04 GB GPU memory with fp16 weights in RAM (ZO2 README table)"),
}


def _model(name: str) -> Any:
    from transformers import LlamaConfig, OPTConfig

    from finetune import offload

    arch, kwargs = MODELS[name]
    if arch == "opt":
        config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=kwargs["hidden_size"],
                           **kwargs)
    else:
        config = LlamaConfig(max_position_embeddings=4096, **kwargs)
    return offload.meta_model(config)


def predict_setup(name: str) -> dict[str, Any]:
    """One setup's prediction as plain numbers (runs in a child process)."""
    import torch

    from finetune import offload, optim

    model_name, profile, optimizer_name, batch, seq, _ = SETUPS[name]
    model = _model(model_name)
    machine = offload.hardware_profile(profile)
    zeroth_order = optimizer_name.startswith("mezo")
    storage = torch.bfloat16 if optimizer_name == "mezo-bf16" else torch.float32  # --storage-dtype
    optimizer = optim.MeZO(storage_dtype=storage) if zeroth_order else optim.AdamW()
    dtype = torch.float32 if zeroth_order else torch.bfloat16  # the engine's MeZO computes in fp32
    device = int(0.9 * machine.device_memory) if machine.device_memory else int(0.45 * machine.ram)
    if zeroth_order:  # ZO2's claim is its GPU memory: run at the engine's least device budget
        device = offload.Engine.minimum_budget(model, optimizer, compute_dtype=dtype)[0]
    host = int(0.9 * machine.ram) - (0 if machine.cuda else device)
    started = time.perf_counter()
    workload = offload.Workload(batch_size=batch, seq_len=seq, updates_in_backward=True)  # Adam overlaps backward
    p = offload.predict(model, optimizer, workload, machine, device_budget=device, host_budget=host, nvme=True,
                        compute_dtype=dtype)
    return {
        "params": sum(t.numel() for t in model.parameters()), "device_budget": device, "host_budget": host,
        "step_s": p.step_s, "tokens_per_s": p.tokens_per_s, "tflops": p.flops / p.step_s / 1e12 if p.step_s else 0,
        "bottleneck": p.bottleneck, "busy_s": p.busy_s, "peak_device_memory": p.peak_device_memory,
        "peak_rss": p.peak_rss, "disk_needed": p.traffic.swap_bytes, "floors": vars(p.floors),
        "predict_s": time.perf_counter() - started,
    }


def _child(name: str, queue: Any) -> None:
    try:
        queue.put(("ok", predict_setup(name)))
    except Exception as error:  # reported, not hidden: a bug in predict is a result of this script
        queue.put(("error", f"{type(error).__name__}: {error}"))


def run(name: str, timeout: float) -> dict[str, Any]:
    model, profile, optimizer, batch, seq, paper = SETUPS[name]
    row: dict[str, Any] = {"setup": name, "model": model, "profile": profile, "optimizer": optimizer,
                           "batch": batch, "seq": seq, "paper": paper}
    queue: Any = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_child, args=(name, queue))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return {**row, "status": f"predict did not return within {timeout:.0f} s"}
    status, value = queue.get() if not queue.empty() else ("error", f"child exited {child.exitcode}")
    return {**row, "status": status, **(value if status == "ok" else {"error": value})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SETUPS), action="append", help="run only these setups")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setup's predict")
    args = parser.parse_args()
    rows = [run(name, args.timeout) for name in (args.only or SETUPS)]
    print(f"{'setup':18} {'machine':20} {'b x seq':>9} {'step s':>9} {'tok/s':>8} {'TFLOPS':>7} "
          f"{'bottleneck':>17} {'GPU GiB':>8} {'RSS GiB':>8} {'disk GiB':>9}")
    for r in rows:
        head = f"{r['setup']:18} {r['profile']:20} {r['batch']:>3} x {r['seq']:<5}"
        if r["status"] != "ok":
            print(f"{head} {r['status'] if 'error' not in r else r['error']}")
            continue
        print(f"{head} {r['step_s']:9.1f} {r['tokens_per_s']:8.0f} {r['tflops']:7.1f} {r['bottleneck']:>17} "
              f"{r['peak_device_memory'] / GiB:8.1f} {r['peak_rss'] / GiB:8.1f} {r['disk_needed'] / GiB:9.0f}")
    out = Path(__file__).parent / "results" / "paper_setups.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"setups": rows}, default=str)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
