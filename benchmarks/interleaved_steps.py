"""stream_overhead's rows (a), (c), (e) and (f) side by side: all four built in one process and stepped in turn,
one step of each per round, so that every ratio compares steps taken within seconds of each other.

Why: this VM's speed drifts by tens of percent over minutes with nothing else running (session 15: the engine's
keep row took 4.25 s a step and, 40 minutes later in the same kind of process, 6.08 s), and stream_overhead runs
its rows one after another, each for about a minute, so its ratios carry that drift. Here the drift hits every
row alike. Peak RSS is not measured (the rows share the process: stream_overhead measures it).

  a) plain PyTorch in RAM (torch.optim.AdamW)
  c) the engine, all state on NVMe, recompute       (stream_overhead row c)
  e) ... activations kept outside the budget         (row e)
  f) ... activations offloaded within the budget     (row f; goal (f)/(a) <= 1.05)

Each row's losses must equal (a)'s to the bit. Prints a table and writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import stream_overhead  # noqa: E402

from finetune import offload, optim  # noqa: E402

ROWS = {"a": "PyTorch in RAM", "c": "engine, NVMe, recompute", "e": "engine, NVMe, activations kept",
        "f": "engine, NVMe, activations offloaded"}
ACTIVATIONS = {"c": "recompute", "e": "keep", "f": "offload"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and batch, for a fast sanity run")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of one step per row; the first is warm-up")
    parser.add_argument("--rows", default="acef", help="which rows, in the order each round runs them")
    parser.add_argument("--nvme-dir", default="/tmp", help="directory for the swap files")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json")
    args = parser.parse_args(argv)
    if args.rounds < 2 or not set(args.rows) <= set(ROWS) or "a" not in args.rows:
        parser.error("--rounds must be >= 2 and --rows letters from 'acef', with 'a'")
    return args


def engine_step(model_dir: Path, swap: Path, activations: str, quick: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    budget = offload.Budget(device="24MB" if quick else "384MB", host="40MB" if quick else "512MB", nvme=swap)
    engine = offload.Engine(model, optim.AdamW(lr=stream_overhead.LR, weight_decay=stream_overhead.WEIGHT_DECAY),
                            budget, prefetch=2, activations=activations,
                            activation_memory="16MB" if quick else "256MB")
    return engine.train_step, engine.close


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.quiet_transformers()
    shape = (dict(hidden=256, intermediate=704, layers=4, heads=4, vocab=8000) if args.quick else
             dict(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000))
    batch, seq = (2, 64) if args.quick else (4, 256)
    info = common.hardware()
    print(common.hardware_line(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="interleaved-", dir=args.nvme_dir))
    closers = []
    try:
        config = common.llama_config(**shape, tie=True, max_positions=2048)
        params = common.save_random_model(config, work / "model", 0)
        batches = common.random_batches(args.rounds, batch, seq, shape["vocab"], 1)
        steps = {}
        for key in args.rows:
            if key == "a":
                steps[key], close = stream_overhead.plain_rows(work / "model", checkpointing=False)
            else:
                steps[key], close = engine_step(work / "model", work / f"swap-{key}", ACTIVATIONS[key], args.quick)
            closers.append(close)
        times: dict[str, list[float]] = {key: [] for key in args.rows}
        losses: dict[str, list[float]] = {key: [] for key in args.rows}
        for round_index, data in enumerate(batches):
            for key in args.rows:
                start = time.perf_counter()
                losses[key].append(steps[key](data))
                if round_index > 0:
                    times[key].append(time.perf_counter() - start)
            print(f"round {round_index + 1}: " + "  ".join(
                f"({key}) {times[key][-1]:.2f} s" if times[key] else f"({key}) warm-up" for key in args.rows),
                flush=True)
    finally:
        for close in closers:
            close()
        shutil.rmtree(work, ignore_errors=True)
    base = common.median(times["a"])
    rows = [{"key": key, "label": ROWS[key], "median_step_s": common.median(times[key]),
             "ratio_to_a": common.median(times[key]) / base, "step_times_s": times[key], "losses": losses[key],
             "losses_equal_a": losses[key] == losses["a"]} for key in args.rows]
    print(common.table(["row", "median step", "/ (a)", "losses = (a)'s"],
                       [[f"({r['key']}) {r['label']}", f"{r['median_step_s']:.2f} s", f"{r['ratio_to_a']:.3f}",
                         "yes" if r["losses_equal_a"] else "NO"] for r in rows]))
    result = {"benchmark": "interleaved_steps", "quick": args.quick, "rounds": args.rounds, "params": params,
              "hardware": info, "thread_env": common.environment_threads(), "rows": rows}
    if "f" in times:
        ratio = common.median(times["f"]) / base
        print(("PASS" if ratio <= 1.05 else "FAIL") + f": (f)/(a) = {ratio:.3f} by median step (target <= 1.05)")
        result["ratio_f_over_a"] = ratio
    common.write_results(args.name or ("interleaved_steps_quick" if args.quick else "interleaved_steps"), result)
    if not all(r["losses_equal_a"] for r in rows):
        raise SystemExit("losses differ from plain PyTorch's")


if __name__ == "__main__":
    main()
