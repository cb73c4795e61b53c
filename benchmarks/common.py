"""Helpers shared by the benchmarks: hardware description, RSS sampling, tables, results files, models.

Not a benchmark itself; the scripts next to it import it as `common` (they put this folder and the repository
root on sys.path).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GiB = 1 << 30
MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ machine


def source_digest() -> str:
    """sha256 (first 12 hex digits) of the engine's sources, offload/*.py and optim/*.py: identifies the code
    measured even when the working tree has changes the commit does not show."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("offload/*.py"), *ROOT.glob("optim/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str:
    """Short commit of the repository, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    memory = psutil.virtual_memory()
    return {
        "cpu": cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "ram_total_bytes": memory.total,
        "ram_available_bytes": memory.available,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "source_digest": source_digest(),
    }


def hardware_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores_logical']} logical cores ({info['torch_threads']} torch threads), "
        f"{info['ram_total_bytes'] / GiB:.1f} GiB RAM, torch {info['torch']}, transformers {info['transformers']}, "
        f"commit {info['git_commit']} (offload+optim sources sha256 {info['source_digest']})"
    )


# ---------------------------------------------------------------------------------------------- memory


def rss() -> int:
    """Resident set size of this process now, in bytes."""
    return psutil.Process().memory_info().rss


def max_rss_rusage() -> int:
    """The kernel's peak RSS of this process, in bytes: VmHWM on Linux, which starts afresh at exec. (ru_maxrss
    does not: a child started by subprocess reports its parent's peak if that was higher.) ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssSampler:
    """Samples this process's RSS on a background thread; `peak` is the largest sample since `reset`."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        value = self._process.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def reset(self) -> None:
        with self._lock:
            self._peak = self._process.memory_info().rss

    @property
    def peak(self) -> int:
        self._sample()
        with self._lock:
            return self._peak


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next measurement starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class CpuClock:
    """CPU seconds used by this process and by everything else on the machine, since the last `lap`.

    On a shared machine a slow step is often someone else's work: `others` says how much CPU other processes
    (and the kernel on their behalf) took meanwhile."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._last = self._read()

    def _read(self) -> tuple[float, float]:
        own = self._process.cpu_times()
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0.0) + getattr(
            machine, "softirq", 0.0) + getattr(machine, "steal", 0.0)
        return own.user + own.system, busy

    def lap(self) -> dict[str, float]:
        now = self._read()
        own, busy = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return {"own": own, "others": max(busy - own, 0.0)}


# ---------------------------------------------------------------------------------------------- output


def fmt_bytes(nbytes: float) -> str:
    if abs(nbytes) >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    return f"{nbytes / MiB:.0f} MiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table; numbers are expected already formatted as strings."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = enumerate(zip(row, widths))
        return "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in cells)

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json and print the same JSON as the last line of stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(payload, sort_keys=False)
    path.write_text(text + "\n")
    print(f"wrote {path}", flush=True)
    print(text, flush=True)
    return path


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- models


def quiet_transformers() -> None:
    """No progress bars or advisory warnings in benchmark output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def llama_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    tie: bool,
    max_positions: int = 2048,
    kv_heads: int | None = None,
    **extra: Any,
) -> Any:
    """A LlamaConfig of these shapes (`kv_heads` None: as many as `heads`); `extra` goes to LlamaConfig as is."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def meta_model(config: Any, *, lora: bool = False) -> torch.nn.Module:
    """`config`'s causal LM on the meta device; with `lora`, wrapped as `finetune run --lora` wraps it (rank 16,
    alpha 32, no dropout, every projection, seeded adapters)."""
    from finetune import offload
    from finetune.cli.lora import wrap_lora

    model = offload.meta_model(config)
    if not lora:
        return model
    return wrap_lora(model, rank=16, alpha=32.0, dropout=0.0, targets="all-linear", seed=0, base_name="benchmark")


def count_params(config: Any) -> int:
    """Parameters of the causal LM `config` describes (tied weights once), without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def save_random_model(config: Any, directory: Path, seed: int) -> int:
    """Build the model with random weights (materialised in RAM), save it as safetensors; returns its params."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    free_memory()
    return params


def random_batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Deterministic token batches (labels = inputs, as in causal LM training)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def environment_threads() -> dict[str, str | None]:
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")
    return {key: os.environ.get(key) for key in keys}


def run_child(script: str | Path, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `script --child SPEC` in a fresh interpreter (its output passes through) and return the JSON it wrote
    to spec["result_path"]."""
    command = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"the measuring child process failed with exit code {completed.returncode}")
    return json.loads(Path(spec["result_path"]).read_text())


def child_or_parent(
    args: Any, main_child: Callable[[dict[str, Any]], None], main_parent: Callable[[Any], None]
) -> None:
    """Run the benchmark (`main_parent`), or, when re-invoked by it with `--child SPEC`, one measured row in this
    fresh process (`main_child`), so each row's peak RSS is its own."""
    if args.child is not None:
        main_child(json.loads(args.child))
    else:
        main_parent(args)
