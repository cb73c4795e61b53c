"""LoRA on a base model several times larger than the RAM budget, the base streamed read-only from its files.

    python benchmarks/lora_stream.py            # full: 495M-param Llama base (bf16 file 945 MiB), ~3 minutes
    python benchmarks/lora_stream.py --quick    # tiny sanity run (~30 s)

The base is a randomly initialised Llama (built from a LlamaConfig, nothing downloaded), saved once with
save_pretrained in --dtype (bf16: 2 bytes per parameter, as models ship) and cached under --workdir, so reruns
skip the build. LoRA r=16 (alpha 32, no dropout) on every attention and MLP projection; the adapters train with
AdamW in fp32 (this CPU computes in fp32, the engine's CPU default, so the bf16 base is converted on read).

Rows (--rows), each measured in a fresh child process (this script re-invoked with --child) so its peak RSS is
its own:
  a) peft in RAM: the whole base loaded in fp32 (`from_pretrained`), torch.optim.AdamW on the adapters, no
     activation checkpointing; the usual peft recipe and the reference for step time, RSS and losses
  b) the engine: the base built on the meta device, its frozen weights read straight from the safetensors
     every time their block is needed (never written to swap), adapters trained with optim.AdamW, at a RAM
     budget (Budget.device + Budget.host) of at most base file bytes / --min-ratio (3); recomputes each layer
     in backward (the engine's default)
  c) as (b) with activations="keep": no recompute, the same math as (a)
  q) as (b) with Engine(..., quantize_frozen="nf4") (QLoRA: the decoder layers' frozen Linear weights stored
     NF4, dequantized on use)

Per row: setup time (model construction + peft + Engine, or from_pretrained + peft + optimizer), time to the
end of the first train_step from the start of setup, median and fastest step over --steps steps after the
first, peak RSS (max of a 20 ms sampler and the kernel's VmHWM; not ru_maxrss, which a child started by
subprocess inherits from its parent: exec records the parent's peak, here the one that built the model), the
RSS left after the last step, and per timed step: the bytes read from the base's safetensors (counted by
wrapping each frozen chunk's source on the instance) against the base file, the same loads as chunks in
compute dtype (what engine.stats() counts), the other chunks read from and written to swap (adapters' weights,
gradients, AdamW moments), and this process's file reads from /proc/self/io. Every row starts from the same
adapter init and trains on the same batches, so the losses of (b) and (c) must equal (a)'s (within 1e-5); (q)
differs by its quantisation.

The machine may be shared: each timed step records the CPU seconds other processes used meanwhile, and the
table gives the fastest step beside the median. --malloc-mmap-threshold (diagnostic) sets glibc's mmap
threshold in every row after `import offload` has set its own (4 MiB), to show how much of the RSS is freed
heap that glibc keeps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from common import MiB, fmt_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LR, WEIGHT_DECAY = 1e-3, 0.0
ADAPTER_SEED = 11
LOSS_TOLERANCE = 1e-5
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# A row's (train step on one batch -> loss, counters -> bytes, close).
Row = tuple[Callable[[dict[str, torch.Tensor]], float], Callable[[], dict[str, float]], Callable[[], None]]


@dataclass
class Config:
    """One row: how the adapters are trained."""

    key: str
    label: str
    engine: bool  # False: peft with the whole base in RAM and torch.optim.AdamW
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of offload.Engine
    same_math_as_reference: bool = True  # its losses must equal row (a)'s


CONFIGS = [
    Config("a", "peft in RAM", engine=False),
    Config("b", "engine, base streamed", engine=True),
    Config("c", "engine, streamed, no recompute", engine=True, options={"activations": "keep"}),
    Config("q", "engine, QLoRA nf4 base", engine=True, options={"quantize_frozen": "nf4"},
           same_math_as_reference=False),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, for a fast sanity run")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--untied", action="store_true", help="separate LM head (default: tied to the embedding)")
    parser.add_argument("--layers", type=int, default=None,
                        help="default: the fewest whose base file reaches --min-ratio x the RAM budget")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved base")
    parser.add_argument("--min-ratio", type=float, default=3.0, help="required base file bytes / RAM budget")
    parser.add_argument("--device-budget", default="min",
                        help="Budget.device of the engine rows; 'min' = Engine.minimum_budget (rounded up to MiB)")
    parser.add_argument("--host-budget", default="min", help="Budget.host of the engine rows; 'min' as above")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row, after the first (untimed) one")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--rows", default="abcq", help="which rows to run, e.g. 'ab'")
    parser.add_argument("--workdir", default="/tmp",
                        help="the base model is cached in <workdir>/finetune-bench/, swap files go below it too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-mmap-threshold", default=None,
                        help="diagnostic: glibc's mmap threshold in every row (e.g. 1MB), instead of offload's 4 MiB")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json (default: "
                        "lora_stream[_quick][_mmap-threshold-<size>])")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one row
    args = parser.parse_args(argv)
    if args.child is None:
        errors = []
        if args.steps < 1:
            errors.append(f"--steps {args.steps} must be >= 1")
        unknown = sorted(set(args.rows) - {c.key for c in CONFIGS})
        if unknown:
            errors.append(f"--rows {args.rows!r} has unknown rows {unknown}; rows are "
                          + ", ".join(c.key for c in CONFIGS))
        if errors:
            parser.error("; ".join(errors))
    if args.quick:
        args.hidden, args.intermediate, args.heads, args.vocab = 256, 704, 4, 8000
        args.batch, args.seq, args.steps = 1, 64, 2
    return args


# ------------------------------------------------------------------------------------------ models


def peft_model(base: torch.nn.Module) -> torch.nn.Module:
    """`base` with LoRA adapters initialised from a fixed seed, as `finetune run --lora` makes them, so every row
    starts from the same adapters whether the base is real or on the meta device."""
    from finetune.cli.lora import wrap_lora

    return wrap_lora(base, rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                     targets=",".join(TARGETS), seed=ADAPTER_SEED, base_name="lora_stream base")


def meta_lora_model(config: Any) -> torch.nn.Module:
    """The LoRA model over a base on the meta device: nothing of the base is in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(config)
    base.tie_weights()  # meta parameters are not tied by construction (see Engine.from_pretrained)
    return peft_model(base)


def llama(args: argparse.Namespace, layers: int) -> Any:
    return common.llama_config(hidden=args.hidden, intermediate=args.intermediate, layers=layers, heads=args.heads,
                               vocab=args.vocab, tie=not args.untied, max_positions=max(2048, args.seq))


def engine_budget(args: argparse.Namespace, configs: list[Config]) -> tuple[int, int]:
    """(device, host) bytes shared by the engine rows `configs`: as given, or the largest of their minimums
    (Engine.minimum_budget, with quantize_frozen for the QLoRA row), rounded up to MiB.
    The minimum does not depend on the layer count: the embedding and head blocks plus one layer on the
    device, one block's update on the host."""
    from finetune import offload, optim

    minimums = [
        offload.Engine.minimum_budget(meta_lora_model(llama(args, 2)), optim.AdamW(lr=LR),
                                      quantize_frozen=config.options.get("quantize_frozen"))
        for config in configs
    ] or [(0, 0)]

    def chosen(option: str, tier: int) -> int:
        if option != "min":
            return offload.parse_size(option)
        return -(-max(m[tier] for m in minimums) // MiB) * MiB  # rounded up to MiB

    return chosen(args.device_budget, 0), chosen(args.host_budget, 1)


def choose_layers(args: argparse.Namespace, budget: int) -> int:
    """The fewest layers whose base file reaches min_ratio x budget (or --layers)."""
    if args.layers is not None:
        return args.layers
    width = DTYPES[args.dtype].itemsize
    one, two = common.count_params(llama(args, 1)), common.count_params(llama(args, 2))
    per_layer, outer = two - one, one - (two - one)
    need = args.min_ratio * budget / width
    return max(2, -int(-(need - outer) // per_layer))


def cached_base(args: argparse.Namespace, layers: int) -> tuple[Path, dict[str, Any]]:
    """The saved base for these settings, built on first use (materialised in RAM once, in this process)."""
    from transformers import AutoModelForCausalLM

    key = (f"lora_stream-L{layers}-h{args.hidden}-i{args.intermediate}-a{args.heads}-v{args.vocab}-"
           f"{'untied' if args.untied else 'tied'}-{args.dtype}-s{args.seed}")
    directory = Path(args.workdir) / "finetune-bench" / key
    marker = directory / "complete.json"
    if marker.exists():
        print(f"base model cached at {directory}", flush=True)
        return directory, json.loads(marker.read_text())
    shutil.rmtree(directory, ignore_errors=True)  # a build that did not finish
    print(f"building the base model ({layers} layers) in {directory} ...", flush=True)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(llama(args, layers)).to(DTYPES[args.dtype])
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    common.free_memory()
    info = {"params": params, "build_s": time.perf_counter() - start}
    marker.write_text(json.dumps(info))
    print(f"  {params / 1e6:.1f}M params, built and saved in {info['build_s']:.1f} s", flush=True)
    return directory, info


# ------------------------------------------------------------------------------------------ the child


def proc_io() -> dict[str, int]:
    """This process's I/O counters (all threads): rchar = bytes returned by read syscalls (page cache or not),
    read_bytes = bytes fetched from the block device."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {name: int(fields[name]) for name in ("rchar", "wchar", "read_bytes", "write_bytes")}


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: allocations of at least `nbytes` get their own memory map (returned to the OS on free); the trim
    threshold follows as offload/heap.py sets it. After `import offload`, which sets its own."""
    import ctypes

    libc = ctypes.CDLL(None)
    if not (libc.mallopt(-3, nbytes) and libc.mallopt(-1, 2 * nbytes)):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        raise SystemExit(f"--malloc-mmap-threshold {nbytes}: mallopt refused it")


def build_in_ram(spec: dict[str, Any]) -> Row:
    """Row (a). Returns (step, stats, close)."""
    from transformers import AutoModelForCausalLM

    model = peft_model(AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WEIGHT_DECAY)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    zeros = dict.fromkeys(["bytes_read", "bytes_written", "peak_device", "peak_host", "base_chunk_bytes",
                           "base_file_bytes", "base_read_busy_s", "load_wait_s"], 0)
    return step, lambda: zeros, lambda: None


def build_engine(spec: dict[str, Any]) -> Row:
    """Rows (b), (c), (q). Returns (step, stats, close)."""
    from transformers import AutoConfig

    from finetune import offload, optim

    model = meta_lora_model(AutoConfig.from_pretrained(spec["model_dir"]))
    budget = offload.Budget(device=spec["device_budget"], host=spec["host_budget"], nvme=spec["swap_dir"])
    probe = EngineProbe()
    engine = offload.Engine(model, optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY), budget,
                            weights=spec["model_dir"], device="cpu", prefetch=spec["prefetch"], timers=probe,
                            **spec["options"])
    probe.watch(engine)
    return engine.train_step, lambda: {**engine.stats(), **probe.snapshot()}, engine.close


class EngineProbe:
    """Counts, cumulatively, from the engine's timers hook (offload/timers.py) and its blocks' frozen sources: loads
    of frozen chunks from the base's safetensors (chunk bytes in compute dtype, file bytes as stored), the seconds
    the frozen-read thread spends reading and converting them, and the seconds the compute thread waits for chunk
    loads (loads that prefetch did not hide)."""

    PHASES = {"frozen read": "base_read_busy_s", "load wait": "load_wait_s"}  # engine phase -> this row's count

    def __init__(self) -> None:
        self.counts = {"base_read_busy_s": 0.0, "load_wait_s": 0.0}
        self._lock = threading.Lock()  # the frozen-read thread reports from its own thread
        self._sources: list[tuple[Any, int]] = []

    def watch(self, engine: Any) -> None:
        """Count the frozen chunk loads of `engine`'s blocks (their SafetensorsSource's `reads`)."""
        for state in engine.blocks:
            source = getattr(state.frozen, "source", None)
            if source is not None:
                self._sources.append((source, state.frozen.nbytes))

    def add(self, name: str, seconds: float) -> None:
        if name in self.PHASES:
            with self._lock:
                self.counts[self.PHASES[name]] += seconds

    def snapshot(self) -> dict[str, float]:
        loads = [(source.reads, chunk_bytes, source.file_bytes) for source, chunk_bytes in self._sources]
        with self._lock:
            return {**self.counts, "base_chunk_bytes": float(sum(n * chunk for n, chunk, _ in loads)),
                    "base_file_bytes": float(sum(n * file for n, _, file in loads))}


def main_child(spec: dict[str, Any]) -> None:
    """One row in a fresh process: set up, one untimed step, then timed steps. Writes spec['result_path']."""
    import peft  # noqa: F401  # imported here so the baseline below counts it
    import transformers  # noqa: F401

    from finetune import (
        offload,  # noqa: F401  # fixes glibc's mmap threshold at import, in every row alike
        optim,  # noqa: F401
    )

    if spec["mmap_threshold"] is not None:
        set_mmap_threshold(spec["mmap_threshold"])
    imports_s = time.time() - psutil.Process().create_time()
    rss_after_imports = common.rss()
    common.quiet_transformers()
    batches = common.random_batches(1 + spec["steps"], spec["batch"], spec["seq"], spec["vocab"], spec["seed"] + 1)
    key = spec["key"]
    with common.RssSampler(0.02) as sampler:
        start = time.perf_counter()
        step, stats, close = (build_engine if spec["engine"] else build_in_ram)(spec)
        setup_s = time.perf_counter() - start
        print(f"  ({key}) set up in {setup_s:.1f} s, RSS {fmt_bytes(common.rss())}", flush=True)
        first_loss = step(batches[0])
        first_step_s = time.perf_counter() - start - setup_s
        print(f"  ({key}) first step {first_step_s:.2f} s, loss {first_loss:.6f}", flush=True)
        peak_setup = sampler.peak  # set-up and first step
        sampler.reset()
        io_before, stats_before = proc_io(), stats()
        clock = common.CpuClock()
        times, losses, cpu_own, cpu_others = [], [first_loss], [], []
        for i, batch in enumerate(batches[1:], start=2):
            clock.lap()
            loss, seconds = common.timed(step, batch)
            cpu = clock.lap()
            times.append(seconds)
            losses.append(loss)
            cpu_own.append(cpu["own"])
            cpu_others.append(cpu["others"])
            print(f"  ({key}) step {i}: {seconds:.2f} s, loss {loss:.6f}, CPU {cpu['own']:.1f} s (other processes "
                  f"{cpu['others']:.1f} s), RSS {fmt_bytes(common.rss())}", flush=True)
        io_after, stats_after = proc_io(), stats()
        peak_steps, rss_after_steps = sampler.peak, common.rss()
        close()
    steps = len(times)

    def delta(name: str) -> float:
        return (stats_after[name] - stats_before[name]) / steps

    result = {
        "hardware": common.hardware(),
        "imports_s": imports_s,
        "rss_after_imports": rss_after_imports,
        "peak_rss": max(peak_setup, peak_steps, common.max_rss_rusage()),
        "peak_rss_kernel": common.max_rss_rusage(),
        "peak_rss_sampled_setup_and_first_step": peak_setup,
        "peak_rss_sampled_timed_steps": peak_steps,
        "rss_after_steps": rss_after_steps,
        "setup_s": setup_s,
        "first_step_s": first_step_s,
        "time_to_first_step_s": setup_s + first_step_s,
        "step_times_s": times,
        "median_step_s": common.median(times),
        "fastest_step_s": min(times),
        "losses": losses,
        "cpu_own_s": cpu_own,
        "cpu_others_s": cpu_others,
        "engine_stats": stats_after,
        "chunk_bytes_loaded_per_step": delta("bytes_read"),
        "base_chunk_bytes_loaded_per_step": delta("base_chunk_bytes"),
        "base_file_bytes_read_per_step": delta("base_file_bytes"),
        "other_chunk_bytes_loaded_per_step": delta("bytes_read") - delta("base_chunk_bytes"),
        "swap_bytes_written_per_step": delta("bytes_written"),
        "load_wait_s_per_step": delta("load_wait_s"),
        "base_read_busy_s_per_step": delta("base_read_busy_s"),
        "file_bytes_read_per_step": (io_after["rchar"] - io_before["rchar"]) / steps,
        "device_bytes_read_per_step": (io_after["read_bytes"] - io_before["read_bytes"]) / steps,
    }
    Path(spec["result_path"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the parent


def run_child(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The row in a fresh interpreter; its output passes through, its result comes back as a file (None: the
    child failed; its traceback is above)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    completed = subprocess.run(command)
    if completed.returncode != 0:
        return None
    return json.loads(Path(spec["result_path"]).read_text())


def report(base: dict[str, Any], results: dict[str, dict[str, Any]], configs: dict[str, Config]) -> dict[str, Any]:
    reference = results.get("a")
    peak = {key: r["peak_rss"] for key, r in results.items()}

    def versus(value: float, key: str, of: Callable[[dict[str, Any]], float]) -> str:
        return f"{value / of(reference):.2f}x" if reference is not None and key != "a" else "-"

    def loss_diff(key: str) -> float | None:
        if reference is None or key == "a":
            return None
        return max(abs(x - y) for x, y in zip(results[key]["losses"], reference["losses"]))

    budget_text = f"{fmt_bytes(base['device_budget'])} + {fmt_bytes(base['host_budget'])}"
    tokens = base["batch"] * base["seq"]
    rows = []
    for key, r in results.items():
        diff = loss_diff(key)
        rows.append([
            f"({key}) {configs[key].label}",
            budget_text if configs[key].engine else "all in RAM",
            f"{r['setup_s']:.1f} s",
            f"{r['time_to_first_step_s']:.1f} s",
            f"{r['median_step_s']:.2f} s",
            versus(r["median_step_s"], key, lambda a: a["median_step_s"]),
            f"{r['fastest_step_s']:.2f} s",
            versus(r["fastest_step_s"], key, lambda a: a["fastest_step_s"]),
            f"{tokens / r['median_step_s']:.0f}",
            fmt_bytes(peak[key]),
            versus(peak[key], key, lambda a: a["peak_rss"]),
            fmt_bytes(r["rss_after_steps"]),
            fmt_bytes(r["rss_after_imports"]),
            "-" if diff is None else f"{diff:.1e}",
        ])
    print(common.table(["row", "RAM budget", "setup", "to 1st step", "median step", "vs (a)", "fastest", "vs (a)",
                        "tokens/s", "peak RSS", "vs (a)", "RSS after steps", "after imports", "max |loss - (a)|"],
                       rows))
    print()
    io_rows = []
    for key, r in results.items():
        io_rows.append([
            f"({key})",
            fmt_bytes(r["base_file_bytes_read_per_step"]),
            f"{r['base_file_bytes_read_per_step'] / base['base_file_bytes']:.2f}x",
            fmt_bytes(r["base_chunk_bytes_loaded_per_step"]),
            f"{fmt_bytes(r['other_chunk_bytes_loaded_per_step'])} / {fmt_bytes(r['swap_bytes_written_per_step'])}",
            fmt_bytes(r["file_bytes_read_per_step"]),
            fmt_bytes(r["device_bytes_read_per_step"]),
            f"{r['load_wait_s_per_step']:.2f} s",
            f"{r['base_read_busy_s_per_step']:.2f} s",
            f"{sum(r['cpu_others_s']):.1f} s",
        ])
    print(common.table(["row", "base file read", "/ base file", "as fp32 chunks", "swap read / written",
                        "all reads (rchar)", "from block device", "main thread waits", "base reader busy",
                        "others' CPU"], io_rows))
    print(f"  per timed step. base file read: the byte ranges read from the {base['dtype']} safetensors "
          f"({fmt_bytes(base['base_file_bytes'])}); as fp32 chunks: the same loads in compute dtype "
          f"(base {fmt_bytes(base['base_fp32_bytes'])}); swap: the other chunks (adapters' weights, gradients, "
          "AdamW moments; QLoRA's quantized base); rchar / block device: /proc/self/io of the whole process; main "
          "thread waits: in ChunkStore.acquire, for loads prefetch did not hide; base reader busy: the frozen-read "
          "thread reading and converting the base (others' CPU: over all timed steps)")
    print()

    ratio = base["base_file_bytes"] / base["budget_bytes"]
    summary: dict[str, Any] = {"base_file_over_budget": ratio, "peak_rss": peak, "loss_max_abs_diff": {}}
    print(f"PASS: base file {fmt_bytes(base['base_file_bytes'])} = {ratio:.2f}x the RAM budget "
          f"{fmt_bytes(base['budget_bytes'])} (need >= {base['min_ratio']:g}x); in fp32 compute "
          f"{base['base_fp32_bytes'] / base['budget_bytes']:.2f}x")
    for key in results:
        diff = loss_diff(key)
        if diff is None:
            continue
        summary["loss_max_abs_diff"][key] = diff
        if configs[key].same_math_as_reference:
            verdict = "PASS" if diff <= LOSS_TOLERANCE else "FAIL"
            print(f"{verdict}: ({key}) losses equal (a)'s within {LOSS_TOLERANCE:g} (max |diff| {diff:.1e})")
        else:
            print(f"      ({key}) losses differ from (a)'s by at most {diff:.1e} (quantised base)")
    for key in [k for k in results if configs[k].engine]:
        r = results[key]
        above = peak[key] - r["rss_after_imports"] - base["budget_bytes"]
        print(f"      ({key}) peak RSS {fmt_bytes(peak[key])} = {peak[key] / base['base_fp32_bytes']:.2f}x the base in "
              f"fp32, {peak[key] / base['base_file_bytes']:.2f}x its file; above imports + budget: {fmt_bytes(above)}")
    noisy = {key: sum(r["cpu_others_s"]) for key, r in results.items()
             if sum(r["cpu_others_s"]) > max(0.5, 0.05 * sum(r["step_times_s"]))}
    summary["noisy_rows"] = noisy
    if noisy:
        print("      WARNING: other processes used CPU during rows " + ", ".join(
            f"({k}) {v:.1f} s" for k, v in noisy.items()) + "; their step times are inflated, compare with care")
    return summary


def main_parent(args: argparse.Namespace) -> None:
    common.quiet_transformers()
    configs = {c.key: c for c in CONFIGS}
    skipped: dict[str, str] = {}  # rows whose child process failed
    runnable = [configs[key] for key in args.rows]
    device_budget, host_budget = engine_budget(args, [c for c in runnable if c.engine])
    budget = device_budget + host_budget
    layers = choose_layers(args, budget)
    model_dir, built = cached_base(args, layers)
    base_file_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    lora = meta_lora_model(llama(args, layers))
    base_params = sum(p.numel() for p in lora.parameters() if not p.requires_grad)
    adapter_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    del lora
    if base_file_bytes < args.min_ratio * budget:
        raise SystemExit(f"the base file ({fmt_bytes(base_file_bytes)}) is below --min-ratio {args.min_ratio:g} x the "
                         f"RAM budget ({fmt_bytes(budget)}); raise --layers (now {layers}) or leave it out")
    info = common.hardware()
    print(f"Machine: {common.hardware_line(info)}")
    print(f"Base:    Llama {layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
          f"{args.vocab}, {'untied' if args.untied else 'tied'}; {base_params / 1e6:.1f}M frozen params, file "
          f"{fmt_bytes(base_file_bytes)} ({args.dtype}), {fmt_bytes(4 * base_params)} in fp32")
    print(f"LoRA:    r={LORA['r']}, alpha {LORA['lora_alpha']} on {', '.join(TARGETS)}: {adapter_params / 1e6:.2f}M "
          f"params; AdamW lr {LR:g}; batch {args.batch} x {args.seq} tokens; 1 untimed + {args.steps} timed steps")
    print(f"Budget:  engine rows {fmt_bytes(device_budget)} device + {fmt_bytes(host_budget)} host = "
          f"{fmt_bytes(budget)} (base file / budget = {base_file_bytes / budget:.2f}x)")
    from finetune import offload

    mmap_threshold = None if args.malloc_mmap_threshold is None else offload.parse_size(args.malloc_mmap_threshold)
    if mmap_threshold is not None:
        print(f"glibc:   mmap threshold {fmt_bytes(mmap_threshold)} in every row (diagnostic; offload sets 4 MiB)")
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="lora_stream-", dir=args.workdir))
    try:
        for key in args.rows:
            config = configs[key]
            print(f"row ({key}) {config.label} ...", flush=True)
            spec = {
                "key": key, "engine": config.engine, "options": config.options, "model_dir": str(model_dir),
                "swap_dir": str(work / f"swap-{key}"), "result_path": str(work / f"{key}.json"),
                "device_budget": device_budget, "host_budget": host_budget, "prefetch": args.prefetch,
                "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "steps": args.steps, "seed": args.seed,
                "mmap_threshold": mmap_threshold,
            }
            result = run_child(spec)
            if result is None:
                skipped[key] = "FAILED in its child process (traceback above)"
                print(f"row ({key}) {config.label}: {skipped[key]}", flush=True)
            else:
                results[key] = result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {
        "layers": layers, "params": built["params"], "base_params": base_params, "adapter_params": adapter_params,
        "dtype": args.dtype, "base_file_bytes": base_file_bytes, "base_fp32_bytes": 4 * base_params,
        "device_budget": device_budget, "host_budget": host_budget, "budget_bytes": budget,
        "min_ratio": args.min_ratio, "batch": args.batch, "seq": args.seq, "model_dir": str(model_dir),
        "build_s": built["build_s"],
    }
    print()
    summary = report(base, results, configs)
    for key, why in skipped.items():
        print(f"      ({key}) skipped: {why}")
    payload = {
        "benchmark": "lora_stream",
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "name")},
        "hardware": info,
        "thread_env": common.environment_threads(),
        "lora": {**LORA, "target_modules": TARGETS, "lr": LR, "weight_decay": WEIGHT_DECAY},
        "configs": {c.key: asdict(c) for c in CONFIGS if c.key in args.rows},
        "base": base,
        "rows": results,
        "skipped": skipped,
        **summary,
    }
    name = "lora_stream_quick" if args.quick else "lora_stream"
    if args.malloc_mmap_threshold is not None:
        name += f"_mmap-threshold-{args.malloc_mmap_threshold}"
    common.write_results(args.name or name, payload)


def main() -> None:
    common.child_or_parent(parse_args(), main_child, main_parent)


if __name__ == "__main__":
    main()
