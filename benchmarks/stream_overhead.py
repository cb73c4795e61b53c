"""What streaming all training state through NVMe costs, against plain in-memory PyTorch, in one run.

    python benchmarks/stream_overhead.py            # full: ~110M-param Llama, batch 4 x 256 (about 6 minutes)
    python benchmarks/stream_overhead.py --quick    # small sanity run (< 1 minute)

Rows, trained one after another in this process from the same initial weights on the same batches (fp32):
  a) plain PyTorch in RAM: model.train(), loss.backward(), torch.optim.AdamW (default, single-tensor on CPU)
  b) the same with activation checkpointing per layer (use_reentrant=False): the same math as the engine,
     which recomputes each layer in its backward
  c) the finetune engine with a RAM budget (--device-budget + --host-budget, default 896 MiB) well below the
     training state (1.63 GiB), so the state lives on NVMe (--nvme-dir) and streams through RAM every step
  d) the finetune engine with budgets large enough for everything in RAM, no NVMe
  e) as (c), with activations="keep": the engine keeps each layer's activations (no recompute), as
     plain PyTorch (a) does, so (e)/(a) compares the same math; the target is (e)/(a) <= 1.10
  f) as (c), with activations="offload": each layer's saved tensors are written to the swap directory as its
     forward makes them and read back ahead of its backward (no recompute, the same math as (a)), holding at most
     --activation-memory of them in RAM; the targets are (f)/(a) <= 1.05 and a peak RSS at most 1.10x (c)'s
  m) MeZO in RAM, plain PyTorch (optim.InMemoryMeZO): per sample, every weight set to theta + eps*z, a forward,
     theta - eps*z, a forward, then the update (the same math as the engine's, so losses agree with (z) to the bit)
  z) MeZO streamed by the engine at its minimum budget (MeZO's state is only the weights, 4 B/param, which (c)'s
     budget would hold whole), so the weights stream through NVMe; the target is (z)/(m) <= 1.05

Each row: --warmup untimed steps, then --steps timed ones; the table gives the median step time, its ratio to
(a) and to (b), NVMe bytes moved per step, the achieved I/O rate, the peak RSS while the row ran, and the
losses (which must agree across rows). Before the rows, the raw O_DIRECT bandwidth of the NVMe directory is
measured with the engine's own backend (offload.ThreadPoolBackend, same workers and request size) on a
--disk-size file, so the engine's I/O can be stated as a fraction of what the disk does.

The machine is shared and noisy: each step also records this process's CPU seconds and those of every other
process meanwhile, and the report warns when others took a noticeable share. Rows run in one process, one after
another, freeing memory between them; glibc may keep freed heap pages, so a row's peak RSS can include what
earlier rows left (MALLOC_MMAP_THRESHOLD_=1048576 in the environment makes large allocations return on free).

For the engine rows the main thread's time blocked in ChunkStore.acquire (waiting for a load, i.e. I/O not
hidden by prefetch), the time train_step waits at its end for optimizer updates, and the optimizer worker's busy
time are measured by wrapping those methods on the instance (nothing in offload/ is changed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import GiB, fmt_bytes  # noqa: E402

from finetune import (
    offload,  # noqa: E402
    optim,  # noqa: E402
)

LR = 1e-4
MEZO = {"lr": 1e-6, "eps": 1e-3, "seed": 0}
ADAMW_ROWS, MEZO_ROWS = "abcdef", "mz"
WEIGHT_DECAY = 0.0
LOSS_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and batch, for a fast sanity run")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--untied", action="store_true", help="separate LM head (default: tied to the embedding)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--device-budget", default="384MB", help="row (c) Budget.device (MB = MiB)")
    parser.add_argument("--host-budget", default="512MB", help="row (c) Budget.host")
    parser.add_argument("--prefetch", type=int, default=2, help="engine prefetch depth (rows c, d, e, f)")
    parser.add_argument("--nvme-dir", default="/tmp", help="directory for the swap files and the disk test")
    parser.add_argument("--disk-size", default="1GB", help="file size for the raw bandwidth test")
    parser.add_argument("--disk-passes", type=int, default=2, help="write+read passes; the best is reported")
    parser.add_argument("--activation-memory", default="256MB", help="row (f) activation_memory: RAM for the "
                        "activations waiting for their writes or read back ahead")
    parser.add_argument("--rows", default="abcdefmz", help="which rows to run, e.g. 'ac'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None,
                        help="results file benchmarks/results/<name>.json (default: stream_overhead[_quick])")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 256, 704, 4, 4, 8000
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 2
        args.device_budget, args.host_budget, args.disk_size, args.disk_passes = "24MB", "40MB", "128MB", 1
        args.activation_memory = "16MB"
    return args


# ------------------------------------------------------------------------------------------- raw disk


def disk_bandwidth(directory: Path, nbytes: int, passes: int) -> dict[str, Any]:
    """O_DIRECT write then read of one `nbytes` file through the engine's backend; best pass of each."""
    writes, reads = [], []
    buffer = offload.aligned_empty(nbytes)
    buffer.view(torch.float32).uniform_()  # incompressible bytes
    with offload.ThreadPoolBackend(directory / "disk-test") as backend:
        file = backend.open("bandwidth", nbytes)
        for _ in range(passes):
            start = time.perf_counter()
            file.write_from(buffer).result()
            writes.append(nbytes / (time.perf_counter() - start))
            start = time.perf_counter()
            file.read_into(buffer).result()
            reads.append(nbytes / (time.perf_counter() - start))
        direct = backend.direct
    del buffer
    common.free_memory()
    return {
        "bytes": nbytes,
        "o_direct": direct,
        "write_Bps_passes": writes,
        "read_Bps_passes": reads,
        "write_Bps": max(writes),
        "read_Bps": max(reads),
    }


# ------------------------------------------------------------------------------------------ the rows


@dataclass
class Row:
    key: str
    label: str
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warmup_losses: list[float] = field(default_factory=list)
    bytes_read: float = 0.0  # per measured step
    bytes_written: float = 0.0
    cpu_own: list[float] = field(default_factory=list)  # CPU seconds of this process, per measured step
    cpu_others: list[float] = field(default_factory=list)  # CPU seconds of other processes meanwhile
    peak_rss: int = 0  # during the measured steps
    peak_rss_setup: int = 0  # while loading the model and warming up
    rss_before: int = 0
    probe: dict[str, float] = field(default_factory=dict)  # engine rows: seconds per measured step
    engine_peaks: dict[str, int] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return common.median(self.step_times)

    @property
    def fastest(self) -> float:
        return min(self.step_times)

    @property
    def all_losses(self) -> list[float]:
        return self.warmup_losses + self.losses


class EngineProbe:
    """Seconds of where an engine's steps go, from its timers hook (`Engine(timers=...)`, offload/timers.py)."""

    PHASES = {"load wait": "acquire_wait", "wait for updates": "update_wait", "update": "update_busy",
              "optimizer math": "optimizer_math"}  # the engine's phase -> this table's column

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES.values(), 0.0)
        self._lock = threading.Lock()  # the optimizer worker reports from its own thread

    def add(self, name: str, seconds: float) -> None:
        column = self.PHASES.get(name)
        if column is not None:
            with self._lock:
                self.seconds[column] += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


# A row: its step(batch) -> loss, and its close().
StepAndClose = tuple[Callable[[dict[str, torch.Tensor]], float], Callable[[], None]]


def plain_rows(model_dir: Path, checkpointing: bool) -> StepAndClose:
    """Rows (a)/(b): the model in RAM, torch.optim.AdamW. Returns (step, close)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def close() -> None:
        nonlocal model, optimizer
        del model, optimizer

    return step, close


def mezo_in_ram(model_dir: Path) -> StepAndClose:
    """Row (m): MeZO on the model in RAM, `optim.InMemoryMeZO` (the engine's math). Returns (step, close)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    optimizer = optim.InMemoryMeZO(model.named_parameters(), optim.MeZO(**MEZO))

    def step(batch: dict[str, torch.Tensor]) -> float:
        return float(optimizer.step(lambda: model(**batch, use_cache=False).loss))

    def close() -> None:
        nonlocal model, optimizer
        del model, optimizer

    return step, close


def mezo_budget(config: Any, swap: Path) -> offload.Budget:
    """Row (z): the engine's minimum budget for MeZO, which is below the weights (its whole state)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is the embedding's weights: count them once
    device, host = offload.Engine.minimum_budget(model, optim.MeZO(**MEZO))
    weights = 4 * sum(p.numel() for p in model.parameters())
    print(f"  (z) budget {fmt_bytes(device)} device + {fmt_bytes(host)} host for {fmt_bytes(weights)} of weights")
    if device + host >= weights:
        print("  (z) WARNING: this budget holds all the weights, so nothing streams (too few layers)")
    return offload.Budget(device=device, host=host, nvme=swap)


def run_plain(key: str, label: str, model_dir: Path, batches: list[dict[str, torch.Tensor]], warmup: int,
              sampler: common.RssSampler, checkpointing: bool, zeroth_order: bool = False) -> Row:
    row = Row(key, label, rss_before=common.rss())
    sampler.reset()
    step, close = mezo_in_ram(model_dir) if zeroth_order else plain_rows(model_dir, checkpointing)
    measure_steps(row, step, batches, warmup, sampler)
    row.peak_rss = sampler.peak
    close()
    return row


def run_engine(key: str, label: str, model_dir: Path, batches: list[dict[str, torch.Tensor]], warmup: int,
               sampler: common.RssSampler, budget: offload.Budget, prefetch: int,
               activations: str = "recompute", activation_memory: str = "256MB", zeroth_order: bool = False) -> Row:
    from transformers import AutoModelForCausalLM

    row = Row(key, label, rss_before=common.rss())
    sampler.reset()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = optim.MeZO(**MEZO) if zeroth_order else optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    probe = EngineProbe()
    engine = offload.Engine(model, optimizer, budget, prefetch=prefetch, activations=activations,
                            activation_memory=activation_memory, timers=probe)
    del model  # the engine holds the weights in its chunks now
    before: dict[str, Any] = {}

    def on_measure_start() -> None:
        before.update(engine.stats(), **probe.snapshot())

    try:
        measure_steps(row, engine.train_step, batches, warmup, sampler, on_measure_start)
        after = {**engine.stats(), **probe.snapshot()}
        steps = max(len(row.step_times), 1)
        # NVMe bytes of the chunks, and of the offloaded activations (row f)
        read, written = ("bytes_read", "activation_bytes_read"), ("bytes_written", "activation_bytes_written")
        row.bytes_read = sum(after.get(name, 0) - before.get(name, 0) for name in read) / steps
        row.bytes_written = sum(after.get(name, 0) - before.get(name, 0) for name in written) / steps
        row.probe = {name: (after[name] - before[name]) / steps for name in probe.seconds}
        row.engine_peaks = {"device": after["peak_device"], "host": after["peak_host"],
                            "activations": after.get("peak_activations", 0)}
        row.peak_rss = sampler.peak
    finally:
        engine.close()
    return row


def measure_steps(row: Row, step: Callable[[dict[str, torch.Tensor]], float], batches: list[dict[str, torch.Tensor]],
                  warmup: int, sampler: common.RssSampler, on_measure_start: Callable[[], None] | None = None) -> None:
    """Warm-up steps, then timed ones; the RSS peak is split at the first timed step (setup vs steps)."""
    clock = common.CpuClock()
    for i, batch in enumerate(batches):
        if i == warmup:
            row.peak_rss_setup = sampler.peak
            sampler.reset()
            if on_measure_start is not None:
                on_measure_start()
        clock.lap()
        start = time.perf_counter()
        loss = step(batch)
        seconds = time.perf_counter() - start
        cpu = clock.lap()
        if i < warmup:
            row.warmup_losses.append(loss)
        else:
            row.step_times.append(seconds)
            row.losses.append(loss)
            row.cpu_own.append(cpu["own"])
            row.cpu_others.append(cpu["others"])
        phase = "warm-up" if i < warmup else "step"
        print(f"  ({row.key}) {phase} {i + 1}: {seconds:.2f} s, loss {loss:.6f}, CPU {cpu['own']:.1f} s "
              f"(other processes {cpu['others']:.1f} s), RSS {fmt_bytes(common.rss())}", flush=True)


# ------------------------------------------------------------------------------------------- report


def loss_agreement(rows: list[Row]) -> dict[str, float]:
    """Largest |loss - loss of the first row of the same optimizer| over all steps (warm-up included), per row:
    the AdamW rows against the first AdamW row, the MeZO rows against the first MeZO row."""
    agreement = {}
    for family in (ADAMW_ROWS, MEZO_ROWS):
        members = [row for row in rows if row.key in family]
        for row in members:
            agreement[row.key] = max(abs(a - b) for a, b in zip(row.all_losses, members[0].all_losses))
    return agreement


def disk_seconds(row: Row, disk: dict[str, Any]) -> float:
    """Seconds the disk would need for one step's bytes at its raw rates, read and write one after the other."""
    return row.bytes_read / disk["read_Bps"] + row.bytes_written / disk["write_Bps"]


RATIOS = [  # (row, against row, what it says, target or None), printed in this order
    ("e", "a", "NVMe, no recompute / (a) plain in RAM", 1.10),
    ("f", "a", "NVMe, activations offloaded / (a) plain in RAM", 1.05),
    ("z", "m", "MeZO streamed on NVMe / (m) MeZO in RAM", 1.05),
    ("c", "a", "NVMe, recompute / (a) plain in RAM", None),
    ("c", "b", "NVMe / (b) plain with checkpointing", None),
    ("c", "d", "NVMe / (d) engine in RAM", None),
]


def report_ratio(summary: dict[str, Any], top: Row, bottom: Row, label: str, target: float | None) -> None:
    """Median and fastest-step ratio of two rows into `summary`, and one line saying it (PASS/FAIL with a target)."""
    name = f"ratio_{top.key}_over_{bottom.key}"
    ratio = summary[name] = top.median / bottom.median
    summary[f"{name}_fastest"] = top.fastest / bottom.fastest
    verdict = "     "
    if target is not None:
        summary[f"target_{top.key}_over_{bottom.key}_le_{target:.2f}"] = ratio <= target
        verdict = "PASS:" if ratio <= target else "FAIL:"
    print(f"{verdict} ({top.key}) {label} = {ratio:.3f} by median step"
          + (f" (target <= {target:.2f})" if target is not None else "")
          + f"; {summary[f'{name}_fastest']:.3f} by fastest step")


def print_report(args: argparse.Namespace, info: dict[str, Any], params: int, disk: dict[str, Any],
                 rows: list[Row], budget_c: int) -> dict[str, Any]:
    by_key = {row.key: row for row in rows}
    base_a, base_b = by_key.get("a"), by_key.get("b")
    state = 16 * params
    print()
    print(f"Machine: {common.hardware_line(info)}")
    print(f"Model:   Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"heads {args.heads}, vocab {args.vocab}, {'untied' if args.untied else 'tied'} embeddings, "
          f"{params / 1e6:.1f}M params, training state {fmt_bytes(state)} (16 B/param); batch {args.batch} x "
          f"{args.seq} tokens; fp32; AdamW lr {LR}; {args.warmup} warm-up + {args.steps} timed steps per row")
    print(f"Row (c) RAM budget: {args.device_budget} device + {args.host_budget} host = {fmt_bytes(budget_c)} "
          f"(state / budget = {state / budget_c:.2f}x); NVMe dir {args.nvme_dir}")
    print()
    print(f"Raw disk, O_DIRECT={disk['o_direct']}, {fmt_bytes(disk['bytes'])} file, engine backend "
          f"(4 workers, 8 MiB requests), best of {len(disk['write_Bps_passes'])}: "
          f"write {disk['write_Bps'] / 1e9:.2f} GB/s, read {disk['read_Bps'] / 1e9:.2f} GB/s "
          f"(passes: write {', '.join(f'{x / 1e9:.2f}' for x in disk['write_Bps_passes'])}; "
          f"read {', '.join(f'{x / 1e9:.2f}' for x in disk['read_Bps_passes'])} GB/s)")
    print()
    headers = ["row", "median step", "vs (a)", "vs (b)", "fastest", "vs (a)", "vs (b)", "NVMe read + written/step",
               "I/O GB/s", "disk busy", "CPU busy", "others' CPU", "peak RSS setup / steps"]
    table_rows = []
    cores = info["cores_logical"] or 1
    for row in rows:
        moved = row.bytes_read + row.bytes_written
        table_rows.append([
            f"({row.key}) {row.label}",
            f"{row.median:.2f} s",
            f"{row.median / base_a.median:.3f}" if base_a else "-",
            f"{row.median / base_b.median:.3f}" if base_b else "-",
            f"{row.fastest:.2f} s",
            f"{row.fastest / base_a.fastest:.3f}" if base_a else "-",
            f"{row.fastest / base_b.fastest:.3f}" if base_b else "-",
            f"{fmt_bytes(row.bytes_read)} + {fmt_bytes(row.bytes_written)}" if moved else "0",
            f"{moved / row.median / 1e9:.2f}" if moved else "-",
            f"{disk_seconds(row, disk) / row.median:.0%}" if moved else "-",
            f"{sum(row.cpu_own) / sum(row.step_times) / cores:.0%}",
            f"{sum(row.cpu_others):.1f} s",
            f"{fmt_bytes(row.peak_rss_setup)} / {fmt_bytes(row.peak_rss)}",
        ])
    print(common.table(headers, table_rows))
    print(f"  I/O GB/s = NVMe bytes read + written per step / median step time; disk busy = time the disk needs "
          f"for those bytes at its raw O_DIRECT rates / median step time; CPU busy = this process's CPU time / "
          f"(step time x {cores} cores); others' CPU = CPU seconds other processes used during the timed steps "
          f"(noise, but kernel threads doing our I/O count too); peak RSS setup = while loading and warming up")
    print()
    print(common.table(
        ["row", "step times (s)", "CPU s / step", "losses (warm-up included)"],
        [[f"({row.key})", " ".join(f"{t:.2f}" for t in row.step_times), " ".join(f"{t:.1f}" for t in row.cpu_own),
          " ".join(f"{x:.6f}" for x in row.all_losses)] for row in rows],
    ))
    agreement = loss_agreement(rows)
    worst = max(agreement.values())
    verdict = "agree" if worst <= LOSS_TOLERANCE else "DISAGREE"
    print(f"  losses (warm-up steps included) {verdict} with the first row of their optimizer (AdamW rows, MeZO "
          f"rows) to {worst:.2e} (tolerance {LOSS_TOLERANCE:g}): "
          + ", ".join(f"({k}) {v:.1e}" for k, v in agreement.items()))
    engine_rows = [row for row in rows if row.probe]
    if engine_rows:
        print()
        print(common.table(
            ["engine row", "main thread waiting in acquire", "waiting for updates at end", "optimizer worker busy",
             "of which AdamW math", "engine peak device / host"],
            [[f"({row.key})", f"{row.probe['acquire_wait']:.2f} s", f"{row.probe['update_wait']:.2f} s",
              f"{row.probe['update_busy']:.2f} s", f"{row.probe['optimizer_math']:.2f} s",
              f"{fmt_bytes(row.engine_peaks['device'])} / {fmt_bytes(row.engine_peaks['host'])}"]
             for row in engine_rows],
        ))
        print("  seconds per measured step; the optimizer worker runs concurrently with backward, so its busy "
              "time overlaps the step time")
    summary: dict[str, Any] = {"loss_max_abs_diff": agreement, "losses_agree": worst <= LOSS_TOLERANCE}
    print()
    for top, bottom, label, target in RATIOS:
        if top in by_key and bottom in by_key:
            report_ratio(summary, by_key[top], by_key[bottom], label, target)
    noisy = {
        row.key: sum(row.cpu_others)
        for row in rows
        if sum(row.cpu_others) > max(0.5, 0.05 * sum(row.step_times))
    }
    if "f" in by_key and "c" in by_key:
        rss = summary["peak_rss_f_over_c"] = by_key["f"].peak_rss / by_key["c"].peak_rss
        summary["target_peak_rss_f_over_c_le_1.10"] = rss <= 1.10
        print(f"{'PASS:' if rss <= 1.10 else 'FAIL:'} (f) peak RSS / (c)'s = {rss:.3f} (target <= 1.10)")
    summary["noisy_rows"] = noisy
    if noisy:
        print("      WARNING: other processes used CPU during rows " + ", ".join(
            f"({k}) {v:.1f} s" for k, v in noisy.items()) + "; their step times are inflated, compare with care")
    for key in [key for key in "cefz" if key in by_key]:
        row = by_key[key]
        summary[f"engine_io_Bps_{key}"] = (row.bytes_read + row.bytes_written) / row.median
        summary[f"engine_disk_busy_fraction_{key}"] = disk_seconds(row, disk) / row.median
        print(f"      ({key}) engine I/O: {summary[f'engine_io_Bps_{key}'] / 1e9:.2f} GB/s; the disk is busy "
              f"{summary[f'engine_disk_busy_fraction_{key}']:.0%} of the step at its raw rates "
              f"(read {disk['read_Bps'] / 1e9:.2f}, write {disk['write_Bps'] / 1e9:.2f} GB/s)")
    return summary


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    common.quiet_transformers()
    torch.manual_seed(args.seed)
    info = common.hardware()
    config = common.llama_config(
        hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
        vocab=args.vocab, tie=not args.untied, max_positions=max(2048, args.seq),
    )
    nvme_root = Path(args.nvme_dir)
    workdir = Path(tempfile.mkdtemp(prefix="stream_overhead-", dir=nvme_root))
    rows: list[Row] = []
    try:
        model_dir = workdir / "model"
        params = common.save_random_model(config, model_dir, args.seed)
        print(f"{params / 1e6:.1f}M-param model saved to {model_dir}", flush=True)
        print("measuring raw disk bandwidth ...", flush=True)
        disk = disk_bandwidth(workdir, offload.parse_size(args.disk_size), args.disk_passes)
        print(f"  write {disk['write_Bps'] / 1e9:.2f} GB/s, read {disk['read_Bps'] / 1e9:.2f} GB/s", flush=True)
        batches = common.random_batches(args.warmup + args.steps, args.batch, args.seq, args.vocab, args.seed + 1)
        budget_c = offload.Budget(device=args.device_budget, host=args.host_budget, nvme=workdir / "swap")
        budget_d = offload.Budget(device=64 * GiB, host=64 * GiB, nvme=None)  # no limit that matters, no NVMe
        with common.RssSampler(0.02) as sampler:
            for key in args.rows:
                common.free_memory()
                print(f"row ({key}) ...", flush=True)
                if key == "a":
                    rows.append(run_plain("a", "PyTorch in RAM", model_dir, batches, args.warmup, sampler, False))
                elif key == "b":
                    rows.append(run_plain("b", "PyTorch in RAM + ckpt", model_dir, batches, args.warmup, sampler, True))
                elif key == "c":
                    rows.append(run_engine("c", "engine, state on NVMe", model_dir, batches, args.warmup, sampler,
                                           budget_c, args.prefetch))
                elif key == "d":
                    rows.append(run_engine("d", "engine, all in RAM", model_dir, batches, args.warmup, sampler,
                                           budget_d, args.prefetch))
                elif key == "e":
                    rows.append(run_engine("e", "engine, NVMe, no recompute", model_dir, batches, args.warmup,
                                           sampler, budget_c, args.prefetch, activations="keep"))
                elif key == "f":
                    rows.append(run_engine("f", "engine, NVMe, activations offloaded", model_dir, batches,
                                           args.warmup, sampler, budget_c, args.prefetch, activations="offload",
                                           activation_memory=args.activation_memory))
                elif key == "m":
                    rows.append(run_plain("m", "MeZO in RAM", model_dir, batches, args.warmup, sampler, False,
                                          zeroth_order=True))
                elif key == "z":
                    rows.append(run_engine("z", "MeZO, state on NVMe", model_dir, batches, args.warmup, sampler,
                                           mezo_budget(config, workdir / "swap"), args.prefetch, zeroth_order=True))
                else:
                    raise SystemExit(f"unknown row {key!r}; rows are a, b, c, d, e, f, m, z")
        budget_c_bytes = budget_c.device + budget_c.host
        summary = print_report(args, info, params, disk, rows, budget_c_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "benchmark": "stream_overhead",
        "quick": args.quick,
        "settings": vars(args),
        "hardware": info,
        "thread_env": common.environment_threads(),
        "params": params,
        "state_bytes": 16 * params,
        "budget_c_bytes": budget_c_bytes,
        "disk": disk,
        "rows": [
            {
                "key": row.key, "label": row.label, "median_step_s": row.median, "step_times_s": row.step_times,
                "warmup_losses": row.warmup_losses, "losses": row.losses,
                "ratio_to_a": row.median / rows[0].median if rows[0].key == "a" else None,
                "bytes_read_per_step": row.bytes_read, "bytes_written_per_step": row.bytes_written,
                "io_Bps": (row.bytes_read + row.bytes_written) / row.median,
                "fastest_step_s": row.fastest, "cpu_own_s": row.cpu_own, "cpu_others_s": row.cpu_others,
                "peak_rss": row.peak_rss, "peak_rss_setup": row.peak_rss_setup, "rss_before": row.rss_before,
                "engine_probe_s_per_step": row.probe, "engine_peaks": row.engine_peaks,
            }
            for row in rows
        ],
        **summary,
    }
    common.write_results(args.name or ("stream_overhead_quick" if args.quick else "stream_overhead"), payload)


if __name__ == "__main__":
    main()
