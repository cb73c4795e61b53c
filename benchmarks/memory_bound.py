"""Train a model whose training state is several times the RAM budget, and check the process stays in budget.

    python benchmarks/memory_bound.py            # full: ~277M-param Llama, 1 GiB RAM budget (1-2 minutes)
    python benchmarks/memory_bound.py --quick    # small sanity run (< 1 minute)

The full training state (fp32 weights + gradients + two AdamW moments = 16 bytes per parameter) must be at
least `--min-ratio` (4) times the RAM budget (Budget.device + Budget.host: on a CPU both are RAM), and the peak
RSS of the training process must stay within budget + `--slack` (0.8 GiB, for the interpreter, torch,
transformers, activations and the optimizer's temporaries).

The parent process builds the model (this materialises it) and saves it as safetensors; the measurement runs in
a fresh child process (this script re-invoked with --child) that loads it with `Engine.from_pretrained`, so the
weights stream from the files block by block and the model is never whole in memory. The child samples its RSS
every 20 ms and also reads ru_maxrss at the end. The layer count is the smallest that reaches the ratio
(override with --layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GiB, fmt_bytes  # noqa: E402

STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients, exp_avg, exp_avg_sq


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and budget, for a fast sanity run")
    parser.add_argument("--device-budget", default="512MB", help="Budget.device (default 512MB = 512 MiB)")
    parser.add_argument("--host-budget", default="512MB", help="Budget.host (default 512MB = 512 MiB)")
    parser.add_argument("--min-ratio", type=float, default=4.0, help="required training state / RAM budget")
    parser.add_argument("--slack", type=float, default=0.8, help="allowed peak RSS above the budget, GiB")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--untied", action="store_true", help="separate LM head (default: tied to the embedding)")
    parser.add_argument("--layers", type=int, default=None, help="default: the fewest that reach --min-ratio")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones")
    parser.add_argument("--steps", type=int, default=3, help="measured train steps")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (--batch must divide)")
    parser.add_argument("--vertical", choices=("auto", "on", "off"), default="auto",
                        help="Engine(vertical=): each block runs all micro-batches while resident (auto: where exact; "
                             "not with a tied embedding, so pass --untied)")
    parser.add_argument("--workdir", default="/tmp", help="where the saved model and the NVMe swap files go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--malloc-mmap-threshold", default=None,
        help="set MALLOC_MMAP_THRESHOLD_ (e.g. 1MB) in the child: glibc then serves every larger allocation "
        "with its own mmap, returned to the OS on free (diagnostic: shows how much of the peak is heap growth)",
    )
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json (default: "
                        "memory_bound[_quick][_mmap-threshold-<size>])")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of the run
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.heads, args.vocab = 256, 704, 4, 8000
        args.device_budget, args.host_budget = "24MB", "40MB"
        args.warmup, args.steps, args.seq = 1, 2, 64
    return args


# ------------------------------------------------------------------------------------------ the parent


def choose_layers(args: argparse.Namespace, budget_bytes: int) -> tuple[int, int]:
    """The fewest layers whose training state reaches min_ratio x budget (or --layers); returns (layers, params)."""

    def params(layers: int) -> int:
        config = common.llama_config(
            hidden=args.hidden, intermediate=args.intermediate, layers=layers, heads=args.heads,
            vocab=args.vocab, tie=not args.untied,
        )
        return common.count_params(config)

    if args.layers is not None:
        return args.layers, params(args.layers)
    one, two = params(1), params(2)
    per_layer, outer = two - one, one - (two - one)
    need_params = args.min_ratio * budget_bytes / STATE_BYTES_PER_PARAM
    layers = max(2, -int(-(need_params - outer) // per_layer))
    return layers, params(layers)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement in a fresh interpreter; its stdout/stderr pass through, its result comes as a file."""
    env = dict(os.environ)
    if spec["malloc_mmap_threshold"] is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["malloc_mmap_threshold"])
    return common.run_child(__file__, spec, env)


def report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    budget = result["budget_bytes"]
    state = result["state_bytes"]
    peak = max(result["peak_rss_sampled"], result["peak_rss_ru_maxrss"])
    limit = budget + int(args.slack * GiB)
    checks = {
        "state_ge_ratio_x_budget": state >= args.min_ratio * budget,
        "peak_rss_le_budget_plus_slack": peak <= limit,
    }
    stats = result["engine_stats"]
    steps = result["step_times_s"]
    print()
    print(f"Machine: {common.hardware_line(result['hardware'])}")
    print(f"Model:   Llama {result['layers']} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"vocab {args.vocab}, {'untied' if args.untied else 'tied'} embeddings, "
          f"{result['params'] / 1e6:.1f}M params; batch {args.batch} x {args.seq} tokens in {args.accumulation} "
          f"micro-batch(es){', vertical schedule' if result['vertical'] else ''}, AdamW fp32")
    threshold = result["thread_env"].get("MALLOC_MMAP_THRESHOLD_")
    print(f"glibc:   MALLOC_MMAP_THRESHOLD_={threshold}" + ("" if threshold else
          " (not set; `import offload` fixes the threshold at 4 MiB, see offload/heap.py)"))
    print()
    rows = [
        ["RAM budget (device + host)", f"{fmt_bytes(budget)}  ({args.device_budget} + {args.host_budget})"],
        ["params (model / trained by engine)", f"{result['params']:,} / {result['engine_params']:,}"],
        ["training state (16 B/param)", fmt_bytes(state)],
        ["state / budget", f"{state / budget:.2f}x  (need >= {args.min_ratio:g}x)"],
        ["RSS after imports (baseline)", fmt_bytes(result["rss_after_imports"])],
        ["peak RSS, sampled every 20 ms", fmt_bytes(result["peak_rss_sampled"])],
        ["peak RSS, ru_maxrss", fmt_bytes(result["peak_rss_ru_maxrss"])],
        ["peak RSS limit (budget + slack)", f"{fmt_bytes(limit)}  (slack {args.slack:g} GiB)"],
        ["peak RSS - budget", fmt_bytes(peak - budget)],
        ["engine peak device / host", f"{fmt_bytes(stats['peak_device'])} / {fmt_bytes(stats['peak_host'])}"],
        ["engine load time", f"{result['load_time_s']:.1f} s"],
        ["warm-up step times", ", ".join(f"{t:.2f} s" for t in result["warmup_times_s"])],
        ["measured step times", ", ".join(f"{t:.2f} s" for t in steps)],
        ["median step time", f"{common.median(steps):.2f} s"],
        ["losses", ", ".join(f"{x:.4f}" for x in result["losses"])],
        ["NVMe read / written per step", f"{fmt_bytes(result['bytes_read_per_step'])} / "
                                          f"{fmt_bytes(result['bytes_written_per_step'])}"],
        ["NVMe read / written total", f"{fmt_bytes(stats['bytes_read'])} / {fmt_bytes(stats['bytes_written'])}"],
    ]
    print(common.table(["quantity", "value"], rows))
    print()
    print(f"{'PASS' if checks['state_ge_ratio_x_budget'] else 'FAIL'}: state {fmt_bytes(state)} >= "
          f"{args.min_ratio:g} x budget {fmt_bytes(budget)}  ({state / budget:.2f}x)")
    print(f"{'PASS' if checks['peak_rss_le_budget_plus_slack'] else 'FAIL'}: peak RSS {fmt_bytes(peak)} <= "
          f"budget + {args.slack:g} GiB = {fmt_bytes(limit)}")
    return {"checks": checks, "peak_rss": peak, "peak_rss_limit": limit, "median_step_s": common.median(steps)}


def main_parent(args: argparse.Namespace) -> None:
    from finetune import offload

    common.quiet_transformers()
    budget_bytes = offload.parse_size(args.device_budget) + offload.parse_size(args.host_budget)
    layers, params = choose_layers(args, budget_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="memory_bound-", dir=args.workdir))
    try:
        model_dir, nvme_dir = workdir / "model", workdir / "swap"
        config = common.llama_config(
            hidden=args.hidden, intermediate=args.intermediate, layers=layers, heads=args.heads,
            vocab=args.vocab, tie=not args.untied,
        )
        print(f"building and saving a {params / 1e6:.1f}M-param model ({layers} layers) to {model_dir} ...",
              flush=True)
        _, build_s = common.timed(common.save_random_model, config, model_dir, args.seed)
        print(f"  done in {build_s:.1f} s; measuring in a fresh process", flush=True)
        spec = {
            "model_dir": str(model_dir), "nvme_dir": str(nvme_dir), "result_path": str(workdir / "result.json"),
            "device_budget": args.device_budget, "host_budget": args.host_budget, "prefetch": args.prefetch,
            "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "warmup": args.warmup,
            "accumulation": args.accumulation, "vertical": {"auto": None, "on": True, "off": False}[args.vertical],
            "steps": args.steps, "seed": args.seed,
            "malloc_mmap_threshold": (
                None if args.malloc_mmap_threshold is None else offload.parse_size(args.malloc_mmap_threshold)
            ),
        }
        result = run_child(spec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # The state counts the parameters the engine actually trains (equal to the model's when it loads correctly).
    state_bytes = result["engine_params"] * STATE_BYTES_PER_PARAM
    result.update(layers=layers, params=params, state_bytes=state_bytes, budget_bytes=budget_bytes)
    summary = report(args, result)
    payload = {
        "benchmark": "memory_bound",
        "quick": args.quick,
        "settings": {key: value for key, value in vars(args).items() if key not in ("child", "name")},
        "build_and_save_s": build_s,
        **result,
        **summary,
    }
    name = "memory_bound_quick" if args.quick else "memory_bound"
    if args.accumulation > 1:
        name += f"_accumulation-{args.accumulation}" + ("" if result["vertical"] else "-horizontal")
    if args.malloc_mmap_threshold is not None:
        name += f"_mmap-threshold-{args.malloc_mmap_threshold}"
    common.write_results(args.name or name, payload)


# ------------------------------------------------------------------------------------------- the child


def main_child(spec: dict[str, Any]) -> None:
    """The measured process: load by streaming, train, record memory. Writes its result to spec['result_path']."""
    from finetune import offload, optim

    rss_after_imports = common.rss()  # torch, transformers, psutil, offload and optim are imported by now
    common.quiet_transformers()
    with common.RssSampler(0.02) as sampler:
        budget = offload.Budget(device=spec["device_budget"], host=spec["host_budget"], nvme=spec["nvme_dir"])
        optimizer = optim.AdamW(lr=1e-4, weight_decay=0.0)
        start = time.perf_counter()
        engine = offload.Engine.from_pretrained(Path(spec["model_dir"]), optimizer, budget, prefetch=spec["prefetch"],
                                                accumulation_steps=spec["accumulation"], vertical=spec["vertical"])
        load_s = time.perf_counter() - start
        # Parameters the engine trains, from its chunk layouts (the module's parameters are empty placeholders).
        engine_params = sum(slot.numel for streamed in engine.blocks for slot in streamed.layout.slots)
        print(f"  loaded in {load_s:.1f} s; RSS now {fmt_bytes(common.rss())}", flush=True)
        batches = common.random_batches(spec["warmup"] + spec["steps"], spec["batch"], spec["seq"],
                                        spec["vocab"], spec["seed"])
        times, losses = [], []
        measured_from = engine.stats()
        for i, batch in enumerate(batches):
            if i == spec["warmup"]:
                measured_from = engine.stats()
            loss, seconds = common.timed(engine.train_step, batch)
            times.append(seconds)
            losses.append(loss)
            phase = "warm-up" if i < spec["warmup"] else "step"
            print(f"  {phase} {i + 1}: {seconds:.2f} s, loss {loss:.4f}, RSS {fmt_bytes(common.rss())}, "
                  f"peak so far {fmt_bytes(sampler.peak)}", flush=True)
        stats = engine.stats()
        engine.close()
        peak_sampled = sampler.peak
    steps = max(spec["steps"], 1)
    result = {
        "hardware": common.hardware(),
        "engine_params": engine_params,
        "vertical": engine.vertical,
        "rss_after_imports": rss_after_imports,
        "peak_rss_sampled": peak_sampled,
        "peak_rss_ru_maxrss": common.max_rss_rusage(),
        "load_time_s": load_s,
        "warmup_times_s": times[: spec["warmup"]],
        "step_times_s": times[spec["warmup"]:],
        "losses": losses,
        "engine_stats": stats,
        "bytes_read_per_step": (stats["bytes_read"] - measured_from["bytes_read"]) / steps,
        "bytes_written_per_step": (stats["bytes_written"] - measured_from["bytes_written"]) / steps,
        "thread_env": common.environment_threads(),
    }
    Path(spec["result_path"]).write_text(json.dumps(result))


# ------------------------------------------------------------------- for benchmarks on memory_bound's model


def saved_model_args(doc: str | None, argv: list[str] | None, *, steps: int, workdir_help: str) -> argparse.Namespace:
    """The command line of a benchmark on memory_bound's model (`measure_on_saved_model`), its shapes taken."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="memory_bound --quick's shapes and budget")
    parser.add_argument("--steps", type=int, default=steps, help="measured steps of each engine (after one warm-up)")
    parser.add_argument("--workdir", default="/tmp", help=workdir_help)
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    take_shapes(args)
    return args


def measure_on_saved_model(args: argparse.Namespace, script: str, name: str,
                           report: Callable[[dict[str, Any]], None]) -> None:
    """The parent of such a benchmark: `run_on_saved_model`, then `report` and the results file `name`(_quick)."""
    result = run_on_saved_model(args, script, f"{name}-")
    report(result)
    common.write_results(args.name or (f"{name}_quick" if args.quick else name),
                         {"benchmark": name, "quick": args.quick, **result})


def take_shapes(args: argparse.Namespace) -> None:
    """Give `args` memory_bound's model shapes, budget and batch (its --quick ones with `args.quick`)."""
    shapes = parse_args(["--quick"] if args.quick else [])
    for key in ("hidden", "intermediate", "heads", "vocab", "untied", "device_budget", "host_budget", "batch", "seq",
                "prefetch", "seed", "min_ratio"):
        setattr(args, key, getattr(shapes, key))
    args.layers = None


def run_on_saved_model(args: argparse.Namespace, script: str, prefix: str) -> dict[str, Any]:
    """Build and save memory_bound's model (`take_shapes`) in a fresh directory under `args.workdir`, run `script`
    as the measuring child on it (spec: workdir, result_path, steps, shapes), remove the directory; the result."""
    from finetune import offload

    common.quiet_transformers()
    budget = offload.parse_size(args.device_budget) + offload.parse_size(args.host_budget)
    layers, params = choose_layers(args, budget)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    try:
        config = common.llama_config(hidden=args.hidden, intermediate=args.intermediate, layers=layers,
                                     heads=args.heads, vocab=args.vocab, tie=not args.untied)
        print(f"building a {params / 1e6:.1f}M-param model ({layers} layers) in {workdir} ...", flush=True)
        common.save_random_model(config, workdir / "model", args.seed)
        spec = {"workdir": str(workdir), "result_path": str(workdir / "result.json"), "steps": args.steps,
                **{key: getattr(args, key) for key in ("device_budget", "host_budget", "batch", "seq", "vocab",
                                                       "prefetch", "seed")}}
        result = common.run_child(script, spec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(layers=layers, params=params)
    return result


def main() -> None:
    common.child_or_parent(parse_args(), main_child, main_parent)


if __name__ == "__main__":
    main()
