"""Training quality and cost of each chunk-wise optimizer on the same small LM, data and step budget.

    python benchmarks/optimizer_quality.py            # full: 4-layer Llama, 3.3M params, 300 steps per row
    python benchmarks/optimizer_quality.py --quick    # 2 layers, 30 steps per row (about a minute)

Model: a Llama built from a config (hidden 256, intermediate 688, 4 heads, untied head) with a byte-level vocabulary
(256 tokens, one per byte, no tokenizer), the same seeded initial weights for every row. Data: the .py sources of
this Python's standard library (`sysconfig.get_paths()["stdlib"]`), as bytes; each file goes to the eval split when
crc32 of its relative path is 0 mod 20, else to train. Training batches are random windows of the train bytes
drawn from one seeded generator, identical for every row; eval is the mean loss on --eval-batches fixed windows of
the eval bytes after the last step.

Each row trains in a fresh child process (this script with --child), so its peak RSS (ru_maxrss) is its own,
through offload.Engine at the engine's minimum budget with its state streamed through NVMe files in --nvme-dir, on
CPU in fp32, constant learning rate, no clipping. Per row: final eval loss and its ratio to AdamW's, state bytes
per parameter (the optimizer's state chunks, padding included, over the model's parameters), median and mean step
time (the mean includes GaLore's and FRUGAL-svd's SVD refresh steps), peak RSS, and the mean train loss of the last
10 steps. Targets: adamw8bit within 1% of AdamW's eval loss, galore and frugal within 5%, and MeZO's train loss
decreasing (mean of the last 10 steps below the mean of the first 10): zeroth-order training from random weights
is far slower per step than any first-order row, and the row is there to show that, not to compete.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import fmt_bytes  # noqa: E402

from finetune import optim  # noqa: E402

VOCAB = 256  # one token per byte
LR = 1e-3

ROWS: dict[str, tuple[str, Callable[[int], optim.ChunkOptimizer | optim.MeZO]]] = {
    # name: (hyperparameters as printed, factory taking the run's update gap)
    "adamw": ("lr 1e-3", lambda gap: optim.AdamW(lr=LR, weight_decay=0.0)),
    "adamw8bit": ("lr 1e-3", lambda gap: optim.AdamW8bit(lr=LR, weight_decay=0.0)),
    "galore": (
        "lr 4e-3, rank 64, scale 0.25, gap T",
        lambda gap: optim.GaLore(lr=4 * LR, rank=64, update_proj_gap=gap, scale=0.25),
    ),
    "frugal": (
        "lr 1e-3, columns, density 0.25, gap T, signSGD",
        lambda gap: optim.Frugal(lr=LR, weight_decay=0.0, density=0.25, update_gap=gap),
    ),
    "frugal-svd": (
        "lr 1e-3, svd, density 0.25, gap T, signSGD",
        lambda gap: optim.Frugal(lr=LR, weight_decay=0.0, density=0.25, subspace="svd", update_gap=gap),
    ),
    "mezo": ("lr 2e-4, eps 1e-3, 1 sample", lambda gap: optim.MeZO(lr=2e-4, eps=1e-3)),
}
TARGETS = {"adamw8bit": 0.01, "galore": 0.05, "frugal": 0.05, "frugal-svd": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 30 steps, small batches: a sanity run")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="optimizers to run")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="training steps per row")
    parser.add_argument("--update-gap", type=int, default=50, help="GaLore's and FRUGAL's subspace period T")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    parser.add_argument("--nvme-dir", default=None, help="swap directory (default: a temporary directory)")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one row
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.update_gap, args.batch, args.eval_batches = 2, 30, 10, 8, 4
    return args


# ------------------------------------------------------------------------------------------------- data


def stdlib_bytes() -> Iterator[torch.Tensor]:
    """Train bytes, then eval bytes (uint8) of the standard library's .py files, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, evaluation = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        split = evaluation if zlib.crc32(path.relative_to(root).as_posix().encode()) % 20 == 0 else train
        split.append(path.read_bytes())
    return (torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) for chunks in (train, evaluation))


def windows(data: torch.Tensor, count: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of `batch` random windows of `seq` bytes (labels = inputs; the model shifts them)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()]).long()
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


# ------------------------------------------------------------------------------------------- the child


def state_bytes_per_param(model: torch.nn.Module, optimizer: optim.ChunkOptimizer | optim.MeZO) -> float:
    """The optimizer's state chunks over all blocks (padded as the engine allocates them) per model parameter."""
    from finetune import offload

    if isinstance(optimizer, optim.MeZO):
        return 0.0  # no state: z is regenerated from seeds
    from finetune.optim.layout import ChunkLayout, chunk_nbytes

    embeddings = optim.embedding_names(model)
    total = 0
    for block in offload.find_blocks(model).blocks:
        layout = ChunkLayout.from_shapes({n: p.shape for n, p in block.params.items()}, embeddings)
        total += sum(chunk_nbytes(spec.numel, spec.dtype) for spec in optimizer.state_specs(layout).values())
    return total / sum(p.numel() for p in model.parameters())


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """One row: build the model, train through the engine with state on NVMe, evaluate."""
    from transformers import AutoModelForCausalLM

    from finetune import offload

    common.quiet_transformers()
    train_bytes, eval_bytes = stdlib_bytes()
    batches = windows(train_bytes, spec["steps"], spec["batch"], spec["seq"], spec["seed"])
    eval_batches = windows(eval_bytes, spec["eval_batches"], spec["batch"], spec["seq"], spec["seed"] + 1)
    config = common.llama_config(
        hidden=spec["hidden"],
        intermediate=spec["intermediate"],
        layers=spec["layers"],
        heads=spec["heads"],
        vocab=VOCAB,
        tie=False,
        max_positions=spec["seq"],
    )
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config).float()
    params = sum(p.numel() for p in model.parameters())
    optimizer = ROWS[spec["row"]][1](spec["update_gap"])
    per_param = state_bytes_per_param(model, optimizer)
    device, host = offload.Engine.minimum_budget(model, optimizer)
    with tempfile.TemporaryDirectory(dir=spec["nvme_dir"]) as swap:
        engine = offload.Engine(model, optimizer, offload.Budget(device=device, host=host, nvme=swap))
        times, losses = [], []
        for i, batch in enumerate(batches):
            loss, seconds = common.timed(engine.train_step, batch)
            times.append(seconds)
            losses.append(loss)
            if (i + 1) % max(1, spec["steps"] // 10) == 0:
                print(f"  {spec['row']}: step {i + 1}/{spec['steps']}, loss {loss:.4f}, {seconds:.2f} s", flush=True)
        eval_loss = sum(engine.eval_loss(batch) for batch in eval_batches) / len(eval_batches)
        stats = engine.stats()
        engine.close()
    measured = times[min(3, len(times) - 1) :]  # the first steps warm up allocators and caches
    return {
        "row": spec["row"],
        "hyperparameters": ROWS[spec["row"]][0].replace("gap T", f"gap {spec['update_gap']}"),
        "optimizer": repr(optimizer),
        "params": params,
        "eval_loss": eval_loss,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
        "state_bytes_per_param": per_param,
        "step_time_median_s": common.median(measured),
        "step_time_mean_s": sum(measured) / len(measured),
        "peak_rss": common.max_rss_rusage(),
        "nvme_bytes_written": stats["bytes_written"],
        "hardware": common.hardware(),
    }


# ------------------------------------------------------------------------------------------ the parent


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({**spec, "out": result.name})]
        completed = subprocess.run(command)
        if completed.returncode != 0:
            raise SystemExit(f"row {spec['row']}: the child process failed with exit code {completed.returncode}")
        return json.loads(Path(result.name).read_text())


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    adamw = next((r["eval_loss"] for r in rows if r["row"] == "adamw"), None)
    print()
    print(f"Machine: {common.hardware_line(rows[0]['hardware'])}")
    print(
        f"Model:   Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, byte vocab "
        f"{VOCAB}, untied, {rows[0]['params'] / 1e6:.2f}M params; {args.steps} steps of {args.batch} x {args.seq} "
        f"bytes of the stdlib's .py sources; eval {args.eval_batches} x {args.batch} x {args.seq} held-out bytes"
    )
    print()
    table = [
        [
            r["row"],
            f"{r['eval_loss']:.4f}",
            f"{r['eval_loss'] / adamw - 1:+.2%}" if adamw else "-",
            f"{r['state_bytes_per_param']:.2f}",
            f"{r['step_time_median_s']:.3f} s",
            f"{r['step_time_mean_s']:.3f} s",
            fmt_bytes(r["peak_rss"]),
            f"{r['train_loss_last10']:.4f}",
            r["hyperparameters"],
        ]
        for r in rows
    ]
    headers = [
        "optimizer",
        "eval loss",
        "vs adamw",
        "state B/param",
        "step median",
        "step mean",
        "peak RSS",
        "train loss (last 10)",
        "hyperparameters",
    ]
    print(common.table(headers, table))
    checks = {}
    for r in rows:
        if adamw and r["row"] in TARGETS:
            gap = r["eval_loss"] / adamw - 1
            checks[r["row"]] = gap <= TARGETS[r["row"]]
            verdict = "PASS" if checks[r["row"]] else "FAIL"
            print(f"{verdict}: {r['row']} eval loss {gap:+.2%} vs adamw (target <= +{TARGETS[r['row']]:.0%})")
        if r["row"] == "mezo":
            first, last = sum(r["losses"][:10]) / 10, sum(r["losses"][-10:]) / 10
            checks["mezo"] = last < first
            print(f"{'PASS' if last < first else 'FAIL'}: mezo train loss {first:.4f} (first 10 steps) -> "
                  f"{last:.4f} (last 10): must decrease")
    return {
        "benchmark": "optimizer_quality",
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "hardware": rows[0]["hardware"],
        "rows": [{k: v for k, v in r.items() if k != "hardware"} for r in rows],
        "checks": checks,
    }


def main() -> None:
    args = parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        Path(spec["out"]).write_text(json.dumps(train(spec)))
        return
    common.quiet_transformers()
    spec = {k: v for k, v in vars(args).items() if k not in ("child", "rows", "quick", "name")}
    rows = []
    for row in args.rows:
        start = time.perf_counter()
        rows.append(run_child({**spec, "row": row}))
        print(f"{row}: eval loss {rows[-1]['eval_loss']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    payload = report(args, rows)
    common.write_results(args.name or ("optimizer_quality_quick" if args.quick else "optimizer_quality"), payload)


if __name__ == "__main__":
    main()
