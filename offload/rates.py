"""The rates the cost model needs, measured on this machine once and cached, or read from a hardware profile.

Measured: FLOP/s in the compute dtype of a decoder layer at the model's own shape (small shapes run far below a
device's peak, and a layer is more than its matrix products, so a generic number would mislead); O_DIRECT read
and write bandwidth of the swap directory through the engine's own NVMe backend; the optimizer's update rate on
the host; a tiny streamed run's peak RSS and time per block, and with LoRA adapters the cost of each adapter and
what peft adds to the process; NF4 dequantization throughput (QLoRA). About twenty seconds in all. The cache
(`~/.cache/finetune/rates.json`, or $FINETUNE_CACHE_DIR) keeps each for a week, by what it depends on: the file
system of the swap directory, the dtype and shape, the device. `refresh=True` measures again, and
`finetune info --bandwidth` refreshes the disk rates.

Profiles (`hardware_profiles.json` beside this module, or a JSON file of the same fields) describe machines
that cannot be measured here: the papers' workstations, a GPU server, a laptop.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import torch

from ..optim.layout import ChunkLayout
from ..optim.mezo import MeZO
from .contention import BUSY_CPU, BUSY_KEEP_S, watch
from .cost_model import Machine
from .durable import write_atomic
from .host_memory import aligned_empty
from .nvme import ThreadPoolBackend
from .quantized import QuantizedLayout

__all__ = ["PROFILES", "DiskRates", "disk_bandwidth", "hardware_profile", "measure_machine", "profile_names",
           "refresh_disk_rates"]

PROFILES = Path(__file__).with_name("hardware_profiles.json")
CACHE_DAYS = 7
PROBE_BYTES = 256 * 2**20
DISK_PROBE_BYTES = 2**30
"""The disk probe's file, unless $FINETUNE_DISK_PROBE_BYTES says otherwise (the tests' 16 MiB: a rate, not a run)."""


def profile_names() -> list[str]:
    return sorted(json.loads(PROFILES.read_text()))


def hardware_profile(name_or_file: str | Path) -> Machine:
    """A machine from the bundled profiles by name, or from a JSON file with the same fields.

    Raises:
        ValueError: no such profile or file, or a file whose fields are not a Machine's.
    """
    path = Path(name_or_file)
    profiles = json.loads(PROFILES.read_text())
    if str(name_or_file) in profiles:
        return Machine(name=str(name_or_file), **profiles[str(name_or_file)]["rates"])
    if not path.is_file():
        raise ValueError(f"no hardware profile {str(name_or_file)!r}; use one of {', '.join(sorted(profiles))}, "
                         "or a JSON file with the fields of a profile")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(Machine)}
    unknown = sorted(set(data.get("rates", data)) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; a profile has {sorted(known)}")
    return Machine(**{"name": path.stem, **data.get("rates", data)})


def disk_probe_bytes() -> int:
    """The size of the file `disk_bandwidth` times when not told: $FINETUNE_DISK_PROBE_BYTES, else 1 GiB."""
    return int(os.environ.get("FINETUNE_DISK_PROBE_BYTES", DISK_PROBE_BYTES))


class DiskRates(NamedTuple):
    """What the disk probe measured: bytes per second each way, and how much of the disk's time this machine's
    CPU compute can run beside (`io_overlap`, see `_io_overlap`)."""

    write: float
    read: float
    overlap: float


def disk_bandwidth(directory: Path, nbytes: int | None = None) -> DiskRates:
    """The rates of one `nbytes` file in a temporary directory under `directory`, through the engine's NVMe
    backend (O_DIRECT where the filesystem allows), so the page cache cannot flatter them.

    The write is timed on the second pass over the file, as swap files are rewritten every step after the first.
    A cloud disk may show a probe of any size here its burst rate: on this project's CI VM the 1 GiB probe read
    0.50-2.40 GB/s and wrote 0.24-0.91 GB/s across a day, an 8 GB one 0.81 / 0.75 (docs/planning.md).

    Raises:
        OSError: the directory cannot be written.
    """
    nbytes = nbytes or disk_probe_bytes()
    buffer = aligned_empty(nbytes)
    buffer.random_(0, 256)  # incompressible, so a compressing filesystem cannot flatter the result
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".finetune-bandwidth-") as probe:
        with ThreadPoolBackend(Path(probe) / "swap") as backend:
            file = backend.open("probe", nbytes)
            file.write_from(buffer).result()  # the file's blocks allocated, as a swap file's are after its first use
            file.sync()

            def write() -> None:
                file.write_from(buffer).result()
                file.sync()  # count the bytes reaching the disk, not the queue

            def read() -> None:
                file.read_into(buffer).result()

            write_s, read_s = _seconds(write), _seconds(read)
            overlap = _io_overlap(lambda: (write(), read()), write_s + read_s)
    return DiskRates(nbytes / write_s, nbytes / read_s, overlap)


OVERLAP_SHAPE = (64, 1024, 2816)  # the compute beside the disk: a matrix product of a 7B layer's shape, scaled down


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _io_overlap(io: Callable[[], object], io_s: float) -> float:
    """The fraction of `io`'s `io_s` seconds that CPU compute beside it does not pay for: 1 where the two do not
    contend, 0 where running them at once takes as long as one after the other.

    Timed as it happens in a step: a compute thread running matrix products (about `io_s` of them) while another
    thread moves the bytes. O_DIRECT costs its process little CPU, yet on this project's 2-vCPU CI VM compute ran
    1.4-1.9x slower beside a read or a write (the hypervisor's I/O shares the cores): the probe hid 0.20-0.55 of
    the disk's time there (docs/planning.md); on CPU the planner adds the rest to the step (cost_model._step_time)."""
    a, b = (torch.randn(*OVERLAP_SHAPE[:2]), torch.randn(*OVERLAP_SHAPE[1:]))
    product_s = min(_seconds(lambda: a @ b) for _ in range(3))
    count = max(1, round(io_s / product_s))

    def compute() -> None:
        for _ in range(count):
            a @ b

    compute_s = _seconds(compute)
    io_thread = threading.Thread(target=io)
    started = time.perf_counter()
    io_thread.start()
    compute()
    io_thread.join()  # both done: what the two cost together
    together_s = time.perf_counter() - started
    return min(1.0, max(0.0, (compute_s + io_s - together_s) / min(compute_s, io_s)))


LAYER_PROBE_BYTES = 2**30  # a probe layer's weights at the most; larger layers are timed at a scaled-down width


def _layer_flops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> float:
    """Achieved FLOP/s of a decoder layer's forward and backward at `shape` (tokens, hidden, intermediate), counted
    as the cost model counts them (6 per weight and token, plus attention).

    A bare matrix product runs well above what a layer gets: norms, rotary-free attention, activations and
    residuals are memory-bound, and small shapes keep the cores waiting. So the probe is a Llama-style layer of
    that shape, with random weights, timed for about half a second (after one warm-up)."""
    tokens, hidden, intermediate = shape
    scale = min(1.0, (LAYER_PROBE_BYTES / (4 * (4 * hidden * hidden + 3 * hidden * intermediate))) ** 0.5)
    hidden, intermediate = max(64, int(hidden * scale) // 64 * 64), max(64, int(intermediate * scale) // 64 * 64)
    heads, seq = hidden // 64, min(tokens, 2048)  # hidden is a multiple of 64
    rows = max(1, tokens // seq)

    def weight(rows_: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows_, cols, device=device) / cols**0.5).to(dtype).requires_grad_()

    qkv, out, up, down = weight(hidden, 3 * hidden), weight(hidden, hidden), weight(hidden, 2 * intermediate), \
        weight(intermediate, hidden)
    x = torch.randn(rows, seq, hidden, device=device).to(dtype).requires_grad_()

    def layer() -> None:
        h = torch.nn.functional.rms_norm(x, (hidden,))
        q, k, v = (h @ qkv).view(rows, seq, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + attention.transpose(1, 2).reshape(rows, seq, hidden) @ out
        gate, value = (torch.nn.functional.rms_norm(h, (hidden,)) @ up).chunk(2, dim=-1)
        (h + (torch.nn.functional.silu(gate) * value) @ down).sum().backward()

    linear = 4 * hidden * hidden + 3 * hidden * intermediate
    per_token = 6 * linear + 3 * 4 * seq * hidden  # forward 2n + attention, backward twice the forward
    return per_token * rows * seq * _runs_per_second(layer, device)


def _runs_per_second(run: Callable[[], None], device: torch.device) -> float:
    """How many times per second `run` runs: once to warm up, then timed for about half a second."""
    run()
    runs, elapsed = 1, 0.0
    while elapsed < 0.5:
        runs *= 2
        started = time.perf_counter()
        for _ in range(runs):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: the kernels queued above are done
        elapsed = time.perf_counter() - started
    return runs / elapsed


DEQUANTIZE_PROBE = (2048, 2048)  # two matrices: 32 MiB of fp32 weights, beyond a CPU's caches


def _dequantize_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Bytes of `dtype` weights per second that NF4 dequantization writes, through the engine's own call
    (`QuantizedLayout.dequantize_into`, as `Residency.hold` makes a QLoRA layer's weights).

    QLoRA dequantizes every quantized layer each time it is held (forward, and backward's recompute), so on a CPU
    this is often the largest part of a step. The rate is memory-bound above the caches, so one probe of a size
    past them stands for any layer."""
    shapes = {name: torch.Size(DEQUANTIZE_PROBE) for name in ("a", "b")}
    layout = QuantizedLayout(ChunkLayout.from_shapes(shapes), frozenset(shapes), dtype)
    codes = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    layout.quantize_into(codes, [torch.randn(shape, device=device) for shape in shapes.values()])
    flat = torch.empty(layout.layout.numel, dtype=dtype, device=device)
    return layout.layout.nbytes(dtype) * _runs_per_second(lambda: layout.dequantize_into(codes, flat), device)


def _convert_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Bytes of `dtype` per second a frozen read makes from a bf16 file's bytes (`frozen.SafetensorsSource`: a
    piece read into a temporary, then copied into the chunk): CPU time beside the compute, where it competes for
    the same cores (a 13B LoRA step converts 94 GB of fp32 on 2 cores)."""
    stored = torch.randn(2**23, device=device).to(torch.bfloat16)
    converted = torch.empty(stored.shape, dtype=dtype, device=device)
    return converted.numel() * converted.element_size() * _runs_per_second(lambda: converted.copy_(stored), device)


def _mezo_rates(device: torch.device) -> dict[str, float]:
    """Elements per second of MeZO's two per-weight passes, on one thread (a seeded generator), a large share of a
    MeZO step on a CPU beside the FLOPs of its forwards: `rate`, drawing z and applying it (`MeZO.direction`, then
    `perturb_into`), done for every weight at each perturbed pass; `update` and `update_bf16`, `MeZO.update` with
    fp32 and bf16 storage (z drawn again, the element-wise step, bf16's stochastic rounding)."""
    from ..optim.mezo import MeZO

    mezo, theta = MeZO(), torch.randn(2**22, device=device)
    rates = {"rate": theta.numel() * _runs_per_second(
        lambda: mezo.perturb_into(mezo.direction(1, 0, "probe", theta), theta, 1), device)}
    for key, dtype in (("update", torch.float32), ("update_bf16", torch.bfloat16)):
        stored, storing = theta.to(dtype), MeZO(storage_dtype=dtype)
        rates[key] = stored.numel() * _runs_per_second(partial(storing.update, stored, "probe", 1, [0.5]), device)
    return rates


def _optimizer_rate() -> float:
    """Bytes of update state per second for an AdamW-like update (weights, gradients, two moments) on the host."""
    numel = 2**22
    weights, grads, exp_avg, exp_avg_sq = (torch.rand(numel) for _ in range(4))
    started = time.perf_counter()
    for _ in range(4):
        exp_avg.lerp_(grads, 0.1)
        exp_avg_sq.mul_(0.999).addcmul_(grads, grads, value=0.001)
        weights.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(1e-8), value=-1e-3)
    return 4 * 2 * 4 * numel * 4 / (time.perf_counter() - started)  # 4 tensors, read and written, 4 bytes, 4 runs


UPDATE_PROBE_SHAPE = (4096, 4096)  # one matrix of a 7B layer: 64 MiB a tensor in fp32, far beyond the caches


def _update_rate(optimizer: Any) -> float:
    """Parameters per second `optimizer` updates on the host, timed on its own `step` over one large matrix.

    Its bytes of state do not price it: bitsandbytes' 8-bit AdamW moves a third of fp32 AdamW's bytes, yet on this
    project's CI VM updated 33 M parameters a second against AdamW's 110 M, and a 7B step spent 200 s there that
    the bytes priced at 27 s. The optimizer keeps its state in the chunks it is given, so timing it changes nothing."""
    layout = ChunkLayout.from_shapes({"weight": torch.Size(UPDATE_PROBE_SHAPE)})
    states = {name: torch.zeros(spec.numel, dtype=spec.dtype) for name, spec in optimizer.state_specs(layout).items()}
    params, grads = torch.randn(layout.numel) / 64, torch.randn(layout.numel) / 1024
    optimizer.step(params, grads, states, step=1, layout=layout)  # first step: lazy state, a GaLore's projection
    return layout.numel / _seconds(lambda: optimizer.step(params, grads, states, step=2, layout=layout))


_TINY_RUN = """
import sys, tempfile, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from finetune import offload, optim
work = tempfile.mkdtemp(dir=sys.argv[1])
ids = torch.randint(0, 256, (1, 8))
budget = offload.Budget(device=2**20, host=2**20, nvme=work + "/swap")

def config(layers):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=256)

def step_s(engine):
    started = time.perf_counter()
    engine.train_step({"input_ids": ids, "labels": ids})
    return time.perf_counter() - started

def peak():
    status = open("/proc/self/status").read()  # VmHWM: this address space's peak (ru_maxrss survives exec)
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

LlamaForCausalLM(config(2)).save_pretrained(work + "/model")
with offload.Engine.from_pretrained(work + "/model", optim.AdamW(lr=1e-3), budget) as engine:
    times = [step_s(engine) for _ in range(16)]
    blocks = len(engine.blocks)
plain = peak()
import peft  # after the plain run's peak: what a LoRA run holds beyond it is peft's
LlamaForCausalLM(config(4)).save_pretrained(work + "/base")
projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def lora(targets):
    model = peft.get_peft_model(LlamaForCausalLM(config(4)), peft.LoraConfig(r=16, target_modules=targets))
    return offload.Engine(model, optim.AdamW(lr=1e-3), budget, weights=work + "/base")

with lora(projections) as every, lora(projections[:1]) as one:  # steps interleaved: both see the same load
    extra = sorted(step_s(every) - step_s(one) for _ in range(9))[4]
print(plain, sorted(times[1:])[7] / blocks, extra / (4 * 6), peak() - plain)
"""


def _tiny_run() -> tuple[int, float, float, int]:
    """Tiny streamed training runs in a fresh process: (the peak RSS of a plain one, its seconds per block and
    step, the seconds per LoRA adapter module and step, and what peft adds to the peak RSS).

    The peak is what every run pays before its chunks and activations (interpreter, torch, transformers, the
    engine's threads and heap); the time, with almost nothing to compute, is the engine's cost of streaming a
    block through a step (hooks, holds, the update's bookkeeping), which dominates small models.

    The adapter's cost is the difference between two LoRA runs on the same 4-layer base read from its files, one
    with adapters on all 7 projections of each layer and one on q_proj only, divided by the 24 adapters between
    them: peft's wrapper, the adapter's small products forward, in recompute and backward, its gradient and its
    update, which is what such a run spends beyond FLOPs (1-2 ms an adapter on a 2-core CPU, against 6 ms a
    block). A direct probe of one peft Linear's forward and backward would miss the engine's side of it (binding
    twice the parameters, their gradient views, norms and update); the difference of two whole runs keeps it and
    cancels the rest. Its FLOPs are few at this shape, and the cost model counts FLOPs apart."""
    with tempfile.TemporaryDirectory(prefix="finetune-baseline-") as work:
        out = subprocess.run([sys.executable, "-c", _TINY_RUN, work], capture_output=True, text=True, check=True)
    peak, per_block, per_adapter, peft_rss = out.stdout.strip().splitlines()[-1].split()
    # Less the chunks (2 MiB of budget each time), counted apart; the second LoRA engine's are in peft's share.
    return int(peak) - 2 * 2**20, float(per_block), max(float(per_adapter), 0.0), max(int(peft_rss) - 2 * 2**20, 0)


def _filesystem(directory: Path | None) -> int | None:
    """The file system `directory` is (or will be) on: disk rates are a property of the disk, not of the path."""
    if directory is None:
        return None
    directory = directory.expanduser().absolute()
    while not directory.exists():
        directory = directory.parent
    return os.stat(directory).st_dev


def _cache_file() -> Path:
    root = Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune"))
    return root / "rates.json"


def measure_machine(
    swap_dir: Path | None,
    compute_dtype: torch.dtype,
    shape: tuple[int, int, int],
    *,
    device: torch.device | None = None,
    optimizer: Any = None,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Machine:
    """This machine's rates for a run: cached ones when fresh, else measured now (about 20 s, each part once).
    With `optimizer`, also the rate its update runs at on the host (cached by its class).

    Each rate is cached by what it depends on: disk rates by the swap directory's file system, FLOP/s by device,
    dtype and `shape` ((tokens per micro-batch, hidden size, intermediate size) of the model's main matrix
    products), the dequantization rate by device and dtype, the rest by device. Without `swap_dir` the disk rates
    are not needed and are left at 1 byte/s (no bytes go to disk)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    say = progress or (lambda message: None)
    entries = _read_cache()

    def cached(section: str, key: object, measure: Callable[[], dict], needs: tuple[str, ...] = ()) -> dict:
        entry = entries.setdefault(section, {}).get(json.dumps([platform.node(), str(device), key]))
        # An entry without a field this version measures (`needs`) was written by an older one: measured again.
        if entry is None or refresh or _stale(entry) or not set(needs) <= entry.keys():
            say(f"measuring this machine's {section} ({device}) ...")
            entry = _measured(measure, section, say)
            entries[section][json.dumps([platform.node(), str(device), key])] = entry
            _write_cache(entries)
        return entry

    disk = {"read": 1.0, "write": 1.0, "overlap": 1.0}
    if swap_dir is not None:
        disk = cached("disk rates", _filesystem(swap_dir), lambda: disk_bandwidth(swap_dir)._asdict(),
                      needs=("overlap",))
    flops = cached("compute rate", [str(compute_dtype), list(shape)],
                   lambda: {"flops": _layer_flops(shape, compute_dtype, device)})
    host = cached("engine costs", None, lambda: _host_rates(device), needs=("adapter_overhead_s", "peft_rss"))
    dequantize = cached("dequantization rate", str(compute_dtype), lambda: {
        "rate": _dequantize_rate(compute_dtype, device), "convert": _convert_rate(compute_dtype, device)},
        needs=("convert",))
    perturb = cached("perturbation rate", None, lambda: _mezo_rates(device), needs=("update", "update_bf16"))
    update = None
    if optimizer is not None and not isinstance(optimizer, MeZO):  # MeZO's update: the perturbation rates
        update = cached("update rate", type(optimizer).__name__, lambda: {"rate": _update_rate(optimizer)})["rate"]
    return Machine(
        name=platform.node() or "this machine", flops=flops["flops"], disk_read=disk["read"],
        disk_write=disk["write"], io_overlap=disk["overlap"], optimizer_rate=host["optimizer_rate"], update_rate=update,
        host_to_device=host["host_to_device"],
        ram=psutil.virtual_memory().total,
        device_memory=torch.cuda.get_device_properties(device).total_memory if cuda else None,
        baseline_rss=host["baseline_rss"], block_overhead_s=host["block_overhead_s"],
        adapter_overhead_s=host["adapter_overhead_s"], peft_rss=host["peft_rss"], dequantize_rate=dequantize["rate"],
        convert_rate=dequantize["convert"],
        perturb_rate=perturb["rate"], mezo_update_rate=perturb["update"], mezo_update_rate_bf16=perturb["update_bf16"],
    )


def refresh_disk_rates(
    directory: Path, nbytes: int | None = None, progress: Callable[[str], None] | None = None
) -> DiskRates:
    """The disk's rates at `directory`, measured now and stored in the cache the planner reads.
    `progress` hears when other processes shared the machine meanwhile (`contention.py`)."""
    entry = _measured(lambda: disk_bandwidth(directory, nbytes)._asdict(), "disk rates",
                      progress or (lambda message: None))
    entries = _read_cache()
    key = json.dumps([platform.node(), "cpu" if not torch.cuda.is_available() else "cuda", _filesystem(directory)])
    entries.setdefault("disk rates", {})[key] = entry
    _write_cache(entries)
    return DiskRates(entry["write"], entry["read"], entry["overlap"])


def _measured(measure: Callable[[], dict], section: str, say: Callable[[str], None]) -> dict:
    """A cache entry: `measure()`'s rates, when, and how much of the machine others used meanwhile."""
    with watch() as seen:
        rates = measure()
    if seen.busy:
        say(f"{section}: other processes used {seen.others_cpu:.0%} of the CPUs while they were measured, so they "
            "may be low; kept for an hour only (`finetune info --bandwidth` measures the disk again)")
    return {"measured_at": time.time(), "others_cpu": seen.others_cpu, **rates}


def _stale(entry: dict) -> bool:
    """Too old to trust: a week for rates measured on a quiet machine, an hour for those that shared it."""
    age = time.time() - entry["measured_at"]
    return age > (BUSY_KEEP_S if entry.get("others_cpu", 0.0) > BUSY_CPU else CACHE_DAYS * 86400)


def _host_rates(device: torch.device) -> dict:
    baseline_rss, block_overhead_s, adapter_overhead_s, peft_rss = _tiny_run()
    return {"optimizer_rate": _optimizer_rate(), "baseline_rss": baseline_rss, "block_overhead_s": block_overhead_s,
            "adapter_overhead_s": adapter_overhead_s, "peft_rss": peft_rss,
            "host_to_device": _host_to_device(device) if device.type == "cuda" else None}


def _read_cache() -> dict:
    cache = _cache_file()
    try:
        return json.loads(cache.read_text()) if cache.is_file() else {}
    except ValueError:  # a cache from another version, or damaged: measured again
        return {}


def _write_cache(entries: dict) -> None:
    write_atomic(_cache_file(), json.dumps(entries, indent=1).encode())


def _host_to_device(device: torch.device) -> float:
    """Pinned host -> device copy bandwidth, bytes per second."""
    host = torch.empty(PROBE_BYTES, dtype=torch.uint8).pin_memory()
    target = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(4):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return 4 * PROBE_BYTES / (time.perf_counter() - started)
