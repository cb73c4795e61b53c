"""finetune side by side with DeepSpeed ZeRO-3 (CPU offload) and ZeRO-Infinity (NVMe) on one job, on this machine.

    apt-get install -y libaio-dev && pip install torch==2.13.0 -e ".[peers]"   # once: DeepSpeed + ninja
    python benchmarks/vs_deepspeed.py            # full: ~110M Llama, 7 rows (about 7 minutes on 2 cores)
    python benchmarks/vs_deepspeed.py --quick    # tiny model, a sanity run (about 1 minute once ops are built)

The job (the same for every row): a Llama-shaped model, hidden 768, 12 layers, 12 heads, intermediate 2048, vocab
32000, tied embeddings (109.5M params), fp32, batch 4 x 256 tokens, AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8,
no weight decay, no clipping; the same initial weights (saved once by the parent, loaded by every row) and the
same batches; 8 steps, the first 2 untimed (warm-up).

Rows (each in a fresh child process, this script re-invoked with --child, so every RSS is its own):
  a) plain PyTorch in RAM: loss.backward(), torch.optim.AdamW
  b) DeepSpeed ZeRO-3, parameters and optimizer state offloaded to CPU (DeepSpeedCPUAdam)
  c) DeepSpeed ZeRO-Infinity, parameters and optimizer state on NVMe (--nvme-dir), through its libaio op
  d) finetune, all state on NVMe, RAM budget 1 GiB (512MB device + 512MB host), layers recomputed in backward
     (the default, memory-minimal)
  e) as (d), activations="keep" (activations kept, no recompute: the same math as a, b, c)
  f) finetune, everything in RAM (no NVMe), recompute
  g) as (f), activations="keep"
  h) as (d), activations="offload": each layer's saved tensors written to the swap directory as forward makes
     them and read back for its backward (no recompute, the same math as a, b, c, within the budget)
  i) as (h), at the engine's minimum budget (Engine.minimum_budget)
finetune rows load with Engine.from_pretrained (the model is never whole in RAM). The DeepSpeed rows build the
model in RAM first, as DeepSpeed's zero.Init(module=...) needs. Importing finetune's `offload` fixes glibc's mmap
threshold for its process (part of finetune); rows a-c run with glibc's defaults.

Columns: median step time over the timed steps, ratio to (a), peak RSS of the timed steps and of the whole
child process (ru_maxrss: model load and setup included), bytes on disk (blocks allocated under the row's swap
directory after the last step), disk bytes read + written per timed step (/proc/self/io), and the losses of all
8 steps, which must agree with (a) to 4 decimals (|difference| < 5e-5). A second table says where each row's
step time goes. Targets: (d) at <= 0.6x (c)'s median step time and <= 1/4 of (c)'s peak RSS; (h) at <= 0.65x
and <= 0.35x.

DeepSpeed on a CPU-only Linux box (measured with deepspeed 0.19.8, torch 2.13.0+cpu); this script does all of it:
  1. DS_ACCELERATOR=cpu in the environment, else DeepSpeed looks for CUDA.
  2. One process without a launcher: MASTER_ADDR=127.0.0.1 MASTER_PORT=<a free port> RANK=0 WORLD_SIZE=1
     LOCAL_RANK=0. Without oneccl_bindings_for_pytorch the CPU accelerator uses gloo; nothing else is needed.
  3. The async I/O op (ZeRO-Infinity) links libaio: `apt-get install libaio-dev` (Debian/Ubuntu).
  4. Ops are compiled with ninja on first use, into ~/.cache/torch_extensions/py311_cpu (TORCH_EXTENSIONS_DIR
     moves it): cpu_adam, then pin_memory and async_io (measured here: 76 s + 17 s + 170 s on 2 cores; about
     11 minutes has been seen on busier ones). Do not interrupt it: a killed build leaves `<op>/lock` there and
     the next load waits on it forever. This script refuses to start the DeepSpeed rows while such a lock exists
     (remove it if no build runs). To build them ahead, run `python benchmarks/vs_deepspeed.py --quick --rows c`.
  5. Partition the already-built model with `deepspeed.zero.Init(module=model, config_dict_or_path=config)`
     before `deepspeed.initialize`. Otherwise ZeRO-Infinity's parameter swapper takes its dtype from the
     accelerator (bf16 on CPUs without fp16) and the first forward fails with a float/BFloat16 mismatch. Do not
     pass dtype= either: zero.Init's fallback picks bf16 there too.
  6. "stage3_max_reuse_distance": 0. With the default the first forward of the full model fails in the NVMe
     parameter swapper: "AssertionError: Not enough buffers 0 for swapping 1".
  7. offload_param.buffer_size >= the largest tensor (the 32000 x 768 embedding, 24.6M elements), else
     initialize fails with "More elements ... than buffer size ...". Here: exactly that size, 5 buffers (default).
  8. offload_param.max_in_cpu = 0. Its default (1e9 elements) copies every parameter of a model this small back
     into one CPU buffer at initialize, so the "NVMe" row would keep its weights in RAM (measured: 1.75 GB read
     per step instead of 2.7 GB; only the optimizer state moves).
  sub_group_size (how much optimizer state is swapped in and updated at once) is --ds-sub-group-size, default
  the largest tensor's size (a sub-group holds at least one tensor, so smaller changes little). DeepSpeed's
  default (1e9) makes the whole model one sub-group: measured peak RSS 6.0 GiB instead of 4.4 GiB, no faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import GiB, fmt_bytes  # noqa: E402

LR = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
LOSS_TOLERANCE = 5e-5  # "agree to 4 decimals"
ROWS = {
    "a": "PyTorch in RAM",
    "b": "DeepSpeed ZeRO-3, CPU offload",
    "c": "DeepSpeed ZeRO-Infinity, NVMe",
    "d": "finetune, all state on NVMe",
    "e": "finetune, NVMe, no recompute",
    "f": "finetune, all in RAM",
    "g": "finetune, in RAM, no recompute",
    "h": "finetune, NVMe, activations offloaded",
    "i": "finetune, as (h), minimum budget",
}
FINETUNE_ROWS = "defghi"
TARGETS = {"d": (0.6, 0.25), "h": (0.65, 0.35)}  # row: (step time, peak RSS) as fractions of ZeRO-Infinity's (c)
DEEPSPEED_ROWS = "bc"
StepFn = Callable[[dict[str, torch.Tensor]], float]  # one training step on a batch -> its loss
FinishFn = Callable[[], dict]  # after the last step: extra result fields (and cleanup)
# where a finetune step goes: the last three overlap the first two (see finetune_row)
ENGINE_PHASES = ["forward", "backward", "final wait for updates", "of fwd+bwd: waiting for loads",
                 "optimizer worker busy (overlaps backward)", "of which AdamW math"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, for a fast sanity run")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--device-budget", default="512MB", help="rows d, e: Budget.device (MB = MiB)")
    parser.add_argument("--host-budget", default="512MB", help="rows d, e: Budget.host")
    parser.add_argument("--ds-sub-group-size", type=int, default=None,
                        help="DeepSpeed zero_optimization.sub_group_size (default: the largest tensor's elements)")
    parser.add_argument("--nvme-dir", default="/tmp", help="where the model, the swap files of every row go")
    parser.add_argument("--rows", default="".join(ROWS), help="which rows to run, e.g. 'acd'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None,
                        help="results file benchmarks/results/<name>.json (default: vs_deepspeed[_quick])")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one row
    args = parser.parse_args(argv)
    if args.child is not None:
        return args
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows {args.rows!r}: unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 256, 704, 4, 4, 8000
        args.batch, args.seq = 2, 64
        args.device_budget, args.host_budget = "24MB", "40MB"
    return args


# ---------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(spec: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 with params and optimizer offloaded to CPU (row b) or to NVMe files (row c, ZeRO-Infinity)."""
    largest = spec["largest_numel"]
    zero: dict[str, Any] = {
        "stage": 3,
        "stage3_max_reuse_distance": 0,  # see the header, item 6
        "sub_group_size": spec["ds_sub_group_size"] or largest,
        "offload_param": {"device": "cpu"},
        "offload_optimizer": {"device": "cpu"},
    }
    if spec["key"] == "c":
        swap = spec["swap_dir"]
        zero["offload_param"] = {"device": "nvme", "nvme_path": swap, "buffer_count": 5,
                                 "buffer_size": largest,  # item 7: one buffer holds the largest tensor
                                 "max_in_cpu": 0}  # item 8: otherwise every weight is copied back into RAM
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": swap}
    return {
        "train_batch_size": spec["batch"],
        "train_micro_batch_size_per_gpu": spec["batch"],
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0}},
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def deepspeed_environment() -> dict[str, str]:
    """Items 1 and 2 of the header: CPU accelerator, one process without a launcher."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def extension_locks() -> list[Path]:
    """`lock` files in the torch extensions cache: a build in progress, or one that was killed (header item 4)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock"))


# ------------------------------------------------------------------------------------------ the child


def proc_io() -> tuple[int, int]:
    """Bytes this process (all threads) made the kernel read from / write to storage."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def disk_usage(directory: Path) -> int:
    """Bytes allocated on disk by the files under `directory`."""
    total = 0
    for path in directory.rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


class Phases:
    """Adds up seconds per named phase; `wrap` times a callable under a name. The engine's optimizer worker
    adds from its own thread, hence the lock."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def wrap(self, function: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


class EngineTimers:
    """The engine's phases (offload/timers.py) under this table's names; its backward is computed from
    train_step instead (see phase_medians)."""

    NAMES = {"forward": ENGINE_PHASES[0], "wait for updates": ENGINE_PHASES[2], "load wait": ENGINE_PHASES[3],
             "update": ENGINE_PHASES[4], "optimizer math": ENGINE_PHASES[5]}

    def __init__(self, phases: Phases) -> None:
        self.phases = phases

    def add(self, name: str, seconds: float) -> None:
        if name in self.NAMES:
            self.phases.add(self.NAMES[name], seconds)


def plain_row(spec: dict[str, Any], phases: Phases) -> tuple[StepFn, FinishFn]:
    """Row (a): the model in RAM, torch.optim.AdamW. Returns (step, finish)."""
    from transformers import AutoModelForCausalLM

    spec["rss_imports"] = common.rss()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases.add("forward", forward - start)
        phases.add("backward", backward - forward)
        phases.add("optimizer step", time.perf_counter() - backward)
        return loss.item()

    return step, dict


def deepspeed_row(spec: dict[str, Any], phases: Phases) -> tuple[StepFn, FinishFn]:
    """Rows (b), (c): DeepSpeed's engine over the same model; forward, engine.backward, engine.step."""
    import logging
    import warnings

    import deepspeed
    from transformers import AutoModelForCausalLM

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, once per step
    config = deepspeed_config(spec)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    spec["rss_imports"] = common.rss()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    deepspeed.zero.Init(module=model, config_dict_or_path=config)  # header item 5: before initialize, no dtype=
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss = engine(**batch, use_cache=False).loss
        forward = time.perf_counter()
        engine.backward(loss)
        backward = time.perf_counter()
        engine.step()
        phases.add("forward", forward - start)
        phases.add("backward", backward - forward)
        phases.add("optimizer step", time.perf_counter() - backward)
        return loss.item()

    def finish() -> dict:
        return {"deepspeed": deepspeed.__version__, "config": config}

    return step, finish


def finetune_row(spec: dict[str, Any], phases: Phases) -> tuple[StepFn, FinishFn]:
    """Rows (d)-(g): offload.Engine.from_pretrained. Where the time goes comes from the engine's timers hook
    (offload/timers.py): its forward, the waits for loads that prefetch did not hide, the wait for optimizer
    updates at the end of train_step, and the optimizer worker's per-block update (which runs concurrently with
    backward)."""
    from finetune import offload, optim

    spec["rss_imports"] = common.rss()
    key = spec["key"]
    adamw = optim.AdamW(lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    device, host = spec["device_budget"], spec["host_budget"]
    if key == "i":
        from transformers import AutoConfig

        device, host = offload.Engine.minimum_budget(offload.meta_model(AutoConfig.from_pretrained(spec["model_dir"])),
                                                     adamw)
        spec["budget"] = [device, host]
    budget = (offload.Budget(device=device, host=host, nvme=spec["swap_dir"]) if key in "dehi"
              else offload.Budget(device=64 * GiB, host=64 * GiB, nvme=None))  # no limit that matters, no NVMe
    activations = "recompute" if key in "df" else "offload" if key in "hi" else "keep"
    engine = offload.Engine.from_pretrained(spec["model_dir"], adamw, budget, activations=activations,
                                            timers=EngineTimers(phases))

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss = engine.train_step(batch)
        phases.add("train_step", time.perf_counter() - start)
        return loss

    def finish() -> dict:
        stats = engine.stats()
        engine.close()
        return {"engine_stats": stats, "budget_device": budget.device, "budget_host": budget.host}

    return step, finish


def main_child(spec: dict[str, Any]) -> None:
    """One row: build, warm up, time the steps, write the result JSON to spec['result']. Each row's maker
    records spec['rss_imports'], the RSS after its imports and before the model loads."""
    common.quiet_transformers()
    with common.RssSampler(0.02) as sampler:
        phases = Phases()
        setup_start = time.perf_counter()
        make = plain_row if spec["key"] == "a" else deepspeed_row if spec["key"] in DEEPSPEED_ROWS else finetune_row
        step, finish = make(spec, phases)
        setup_s = time.perf_counter() - setup_start
        batches = common.random_batches(spec["warmup"] + spec["steps"], spec["batch"], spec["seq"], spec["vocab"],
                                        spec["seed"] + 1)
        clock = common.CpuClock()
        losses, times, cpu_own, cpu_others, phase_steps = [], [], [], [], []
        io_start = (0, 0)
        peak_setup = 0
        for i, batch in enumerate(batches):
            if i == spec["warmup"]:
                peak_setup = sampler.peak
                sampler.reset()
                io_start = proc_io()
            before = phases.snapshot()
            clock.lap()
            start = time.perf_counter()
            loss = step(batch)
            seconds = time.perf_counter() - start
            cpu = clock.lap()
            losses.append(loss)
            if i >= spec["warmup"]:
                times.append(seconds)
                cpu_own.append(cpu["own"])
                cpu_others.append(cpu["others"])
                phase_steps.append({k: v - before.get(k, 0.0) for k, v in phases.snapshot().items()})
            print(f"  ({spec['key']}) {'warm-up' if i < spec['warmup'] else 'step'} {i + 1}: {seconds:.2f} s, "
                  f"loss {loss:.6f}, CPU {cpu['own']:.1f} s (others {cpu['others']:.1f} s), "
                  f"RSS {fmt_bytes(common.rss())}", flush=True)
        io_end = proc_io()
        peak_steps = sampler.peak
        swap = Path(spec["swap_dir"])
        on_disk = disk_usage(swap) if swap.exists() else 0
        extra = finish()
    result = {
        "key": spec["key"], "setup_s": setup_s, "losses": losses, "step_times_s": times, "cpu_own_s": cpu_own,
        "cpu_others_s": cpu_others, "phases_s": phase_steps, "peak_rss_setup": peak_setup,
        "peak_rss_steps": peak_steps, "peak_rss_process": max(common.max_rss_rusage(), peak_setup, peak_steps),
        "disk_read_per_step": (io_end[0] - io_start[0]) / len(times),
        "disk_written_per_step": (io_end[1] - io_start[1]) / len(times),
        "bytes_on_disk": on_disk, "rss_after_imports": spec["rss_imports"], "torch_threads": torch.get_num_threads(),
        **extra,
    }
    result["phase_medians_s"] = phase_medians(result)
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- parent


def run_row(spec: dict[str, Any]) -> dict[str, Any] | str:
    """Run one row in a child process; its result, or a one-line reason it failed."""
    env = dict(os.environ)
    if spec["key"] in DEEPSPEED_ROWS:
        env.update(deepspeed_environment())
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    completed = subprocess.run(command, env=env)
    result = Path(spec["result"])
    if completed.returncode != 0 or not result.exists():
        return f"child exited with code {completed.returncode} (its output is above)"
    return json.loads(result.read_text())


def check_deepspeed() -> str | None:
    """Why the DeepSpeed rows cannot run here, or None."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        return f"deepspeed is not installed ({error}); pip install torch==2.13.0 -e \".[peers]\""
    locks = extension_locks()
    if locks:
        return (f"{', '.join(map(str, locks))} exists: a DeepSpeed op build is running or was killed. If no build "
                "runs (ps aux | grep ninja), remove the file and rerun")
    return None


def phase_medians(result: dict[str, Any]) -> dict[str, float]:
    """Median seconds per step of each phase over the timed steps; for finetune rows, backward is what
    train_step spends outside forward and the final wait for updates (the waits for loads and the worker's
    time overlap forward and backward, they are not added)."""
    steps = result["phases_s"]
    names = ENGINE_PHASES if result["key"] in FINETUNE_ROWS else ["forward", "backward", "optimizer step"]
    medians = {name: common.median([step.get(name, 0.0) for step in steps]) for name in names}
    if result["key"] in FINETUNE_ROWS:
        medians[names[1]] = common.median([step["train_step"] - step.get("forward", 0.0) - step.get(names[2], 0.0)
                                           for step in steps])
    return medians


def phase_summary(result: dict[str, Any]) -> str:
    return "; ".join(f"{name} {seconds:.2f} s" for name, seconds in phase_medians(result).items())


def target_vs_zero_infinity(c: dict[str, Any], d: dict[str, Any], key: str = "d") -> dict[str, Any]:
    """Row `key`'s targets (`TARGETS`: its median step time and peak RSS as fractions of ZeRO-Infinity's), printed
    and returned. RSS is compared as measured and also above each process's RSS after imports (what the training
    itself adds)."""
    time_target, rss_target = TARGETS[key]
    time_ratio = common.median(d["step_times_s"]) / common.median(c["step_times_s"])
    rss = {
        "steps": d["peak_rss_steps"] / c["peak_rss_steps"],
        "process": d["peak_rss_process"] / c["peak_rss_process"],
        "process above imports": (d["peak_rss_process"] - d["rss_after_imports"])
        / (c["peak_rss_process"] - c["rss_after_imports"]),
    }
    rss_ok = max(rss["steps"], rss["process"]) <= rss_target
    print(f"{'PASS' if time_ratio <= time_target else 'FAIL'}: ({key}) {ROWS[key]} / (c) ZeRO-Infinity median step "
          f"time = {time_ratio:.2f} (target <= {time_target:.2f})")
    print(f"{'PASS' if rss_ok else 'FAIL'}: ({key}) / (c) peak RSS = {rss['steps']:.2f} during the steps, "
          f"{rss['process']:.2f} over the whole process (target <= {rss_target:.2f}); above RSS after imports: "
          f"{rss['process above imports']:.2f}")
    return {f"ratio_time_{key}_over_c": time_ratio, f"ratio_rss_{key}_over_c": rss,
            f"target_time_{key}": time_ratio <= time_target, f"target_rss_{key}": rss_ok}


def report(args: argparse.Namespace, info: dict[str, Any], params: int, results: dict[str, dict | str]) -> dict:
    done = {key: r for key, r in results.items() if isinstance(r, dict)}
    base = done.get("a")
    print()
    print(f"Machine: {common.hardware_line(info)}")
    versions = sorted({r["deepspeed"] for r in done.values() if "deepspeed" in r})
    print(f"DeepSpeed {', '.join(versions) or '(no DeepSpeed row ran)'}; swap and model under {args.nvme_dir}")
    print(f"Job: Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, heads "
          f"{args.heads}, vocab {args.vocab}, tied, {params / 1e6:.1f}M params (state {fmt_bytes(16 * params)} at "
          f"16 B/param), fp32, batch {args.batch} x {args.seq}, AdamW lr {LR} wd 0, {args.warmup} warm-up + "
          f"{args.steps} timed steps; finetune NVMe budget {args.device_budget} + {args.host_budget}")
    print()
    rows = []
    for key, result in results.items():
        if not isinstance(result, dict):
            rows.append([f"({key}) {ROWS[key]}", "FAILED", "-", "-", "-", "-", "-", "-"])
            continue
        median = common.median(result["step_times_s"])
        rows.append([
            f"({key}) {ROWS[key]}", f"{median:.2f} s",
            f"{median / common.median(base['step_times_s']):.2f}x" if base else "-",
            f"{fmt_bytes(result['peak_rss_steps'])} / {fmt_bytes(result['peak_rss_process'])}",
            fmt_bytes(result["rss_after_imports"]),
            fmt_bytes(result["bytes_on_disk"]) if result["bytes_on_disk"] else "0",
            f"{fmt_bytes(result['disk_read_per_step'])} + {fmt_bytes(result['disk_written_per_step'])}",
            " ".join(f"{x:.4f}" for x in result["losses"]),
        ])
    print(common.table(["row", "median step", "vs (a)", "peak RSS steps / process", "RSS after imports", "on disk",
                        "disk read + written / step", "losses (all steps, warm-up first)"], rows))
    print("  peak RSS steps = sampled every 20 ms during the timed steps; process = the child's ru_maxrss (model "
          "load, setup and warm-up included); RSS after imports = before the model is loaded (interpreter, torch, "
          "transformers, the row's library); on disk = blocks allocated under the row's swap directory after the "
          "last step; disk read + written = /proc/self/io over the timed steps, per step")
    for key, result in results.items():
        if not isinstance(result, dict):
            print(f"  ({key}) FAILED: {result}")
    print()
    print(common.table(["row", "step times (s)", "where the time goes (median per step)"],
                       [[f"({k})", " ".join(f"{t:.2f}" for t in r["step_times_s"]), phase_summary(r)]
                        for k, r in done.items()]))
    summary: dict[str, Any] = {}
    if base:
        diffs = {k: max(abs(x - y) for x, y in zip(r["losses"], base["losses"])) for k, r in done.items()}
        agree = all(v < LOSS_TOLERANCE for v in diffs.values())
        summary.update(loss_max_abs_diff=diffs, losses_agree=agree)
        print()
        print(f"{'PASS' if agree else 'FAIL'}: every step's loss agrees with (a) to 4 decimals (|diff| < "
              f"{LOSS_TOLERANCE:g}) in rows {', '.join(done)}: "
              + ", ".join(f"({k}) {v:.1e}" for k, v in diffs.items()))
    for key in TARGETS:
        if "c" in done and key in done:
            summary.update(target_vs_zero_infinity(done["c"], done[key], key))
    if "c" in done and "e" in done:  # the same math: neither recomputes activations
        c, e = done["c"], done["e"]
        ratio = common.median(e["step_times_s"]) / common.median(c["step_times_s"])
        summary["ratio_time_e_over_c"] = ratio
        print(f"      (e) finetune NVMe without recompute / (c) ZeRO-Infinity (the same math) = {ratio:.2f} by median "
              f"step time; peak RSS {e['peak_rss_process'] / c['peak_rss_process']:.2f}")
    others = {k: sum(r["cpu_others_s"]) for k, r in done.items()
              if sum(r["cpu_others_s"]) > max(0.5, 0.05 * sum(r["step_times_s"]))}
    summary["noisy_rows"] = others
    if others:
        print("WARNING: other processes used CPU during rows " + ", ".join(f"({k}) {v:.1f} s" for k, v in
                                                                          others.items()) + "; compare with care")
    return summary


def main_parent(args: argparse.Namespace) -> None:
    common.quiet_transformers()
    started = time.perf_counter()
    info = common.hardware()
    config = common.llama_config(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                                 heads=args.heads, vocab=args.vocab, tie=True, max_positions=max(2048, args.seq))
    workdir = Path(tempfile.mkdtemp(prefix="vs_deepspeed-", dir=args.nvme_dir))
    results: dict[str, dict | str] = {}
    try:
        model_dir = workdir / "model"
        params = common.save_random_model(config, model_dir, args.seed)
        largest = args.vocab * args.hidden  # the (tied) embedding is the largest tensor
        print(f"{params / 1e6:.1f}M-param model saved to {model_dir}", flush=True)
        blocked = check_deepspeed() if set(args.rows) & set(DEEPSPEED_ROWS) else None
        for key in args.rows:
            if key in DEEPSPEED_ROWS and blocked:
                print(f"row ({key}) skipped: {blocked}", flush=True)
                results[key] = blocked
                continue
            print(f"row ({key}) {ROWS[key]} ...", flush=True)
            spec = {"key": key, "model_dir": str(model_dir), "swap_dir": str(workdir / f"swap-{key}"),
                    "result": str(workdir / f"result-{key}.json"), "batch": args.batch, "seq": args.seq,
                    "vocab": args.vocab, "warmup": args.warmup, "steps": args.steps, "seed": args.seed,
                    "largest_numel": largest, "ds_sub_group_size": args.ds_sub_group_size,
                    "device_budget": args.device_budget, "host_budget": args.host_budget}
            results[key] = run_row(spec)
            shutil.rmtree(spec["swap_dir"], ignore_errors=True)
        summary = report(args, info, params, results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started
    print(f"total runtime {total / 60:.1f} min")
    payload = {
        "benchmark": "vs_deepspeed", "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "name")},
        "hardware": info, "thread_env": common.environment_threads(), "params": params,
        "rows": {k: ({"label": ROWS[k], **r} if isinstance(r, dict) else {"label": ROWS[k], "failed": r})
                 for k, r in results.items()},
        "total_runtime_s": total, **summary,
    }
    common.write_results(args.name or ("vs_deepspeed_quick" if args.quick else "vs_deepspeed"), payload)


def main(argv: list[str] | None = None) -> None:
    """The parent runs every row in a child process and reports; a child (--child SPEC) measures one row."""
    args = parse_args(argv)
    if args.child is None:
        main_parent(args)
        return
    main_child(json.loads(args.child))


if __name__ == "__main__":
    main()
