"""Write a Hugging Face causal-LM directory of any size with random weights, tensor by tensor, never whole in RAM.

    python benchmarks/synthetic_model.py llama-7b /data/llama-7b              # 6.74B params, 12.55 GiB of bf16
    python benchmarks/synthetic_model.py llama-13b /data/llama-13b --seed 1   # 13.0B params, 24.24 GiB
    python benchmarks/synthetic_model.py llama-1b /tmp/llama-1b --layers 4    # the 1B's width, 4 layers

The benchmarks need 7B and 13B models on a machine that cannot download them and has less RAM than a 13B model
in bf16 (26 GB). `write_synthetic_model(config, directory)` builds the model on the meta device (shapes only),
generates each parameter on its own and streams it into safetensors shards, so the parameter names, shapes and
files are exactly what `save_pretrained` would write and `from_pretrained` / `Engine.from_pretrained` expect.

Memory: threads + 2 slices of SLICE_ELEMENTS (8 MiB each in bf16) and a 16 MiB fp32 scratch slice per thread
(64 MiB with 2 threads), whatever the model's size: each slice is written to its shard as soon as it is drawn,
so no tensor is ever whole in RAM.

Speed: the slices are drawn on a thread pool (one thread per CPU this process may use) a few ahead of the one the
main thread writes, so drawing and writing overlap; each shard is fsync'd before the next starts, so the
throughput printed includes the disk, not only the page cache. Measured in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CpuClock, GiB, fmt_bytes, llama_config, quiet_transformers  # noqa: E402
from transformers import LlamaConfig, PretrainedConfig  # noqa: E402

from finetune.offload import encode_header, meta_model, plan_shards, shard_index, shard_names  # noqa: E402

__all__ = ["PRESETS", "NotEnoughDisk", "llama_1b", "llama_7b", "llama_13b", "llama_tiny", "write_synthetic_model"]

SLICE_ELEMENTS = 1 << 22
"""Elements generated per task (8 MiB of bf16). Each slice has its own seed, so the bytes depend on this value:
changing it changes every model written."""

SYNC_EVERY = 256 << 20
"""Bytes written to a shard between background fsyncs (see _write_shard)."""

HEADROOM = 1 << 20
"""Bytes wanted free beyond the tensors: safetensors headers, the index, config.json."""


class NotEnoughDisk(OSError):
    """The target file system has fewer free bytes than the model needs."""


# ------------------------------------------------------------------------------------------------- presets


def _llama(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, max_positions: int
) -> LlamaConfig:
    return llama_config(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                        vocab=vocab, tie=False, max_positions=max_positions, rms_norm_eps=1e-5, initializer_range=0.02)


def llama_tiny() -> LlamaConfig:
    """A 2-layer Llama of 0.1M parameters (hidden 64, 4 heads, 2 KV heads, vocab 256), for tests."""
    return _llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256, max_positions=256)


def llama_1b() -> LlamaConfig:
    """TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000."""
    return _llama(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, max_positions=2048)


def llama_7b() -> LlamaConfig:
    """Llama-2-7B's shape: hidden 4096, intermediate 11008, 32 layers, 32 heads (no GQA), vocab 32000."""
    return _llama(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, max_positions=4096)


def llama_13b() -> LlamaConfig:
    """Llama-2-13B's shape: hidden 5120, intermediate 13824, 40 layers, 40 heads (no GQA), vocab 32000."""
    return _llama(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000, max_positions=4096)


PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    "llama-tiny": llama_tiny,
    "llama-1b": llama_1b,
    "llama-7b": llama_7b,
    "llama-13b": llama_13b,
}


# ---------------------------------------------------------------------------------------------- generation

Spec = tuple[str, torch.Size, torch.dtype]  # (tensor name, shape, stored dtype)


def _slice_seed(seed: int, name: str, index: int) -> int:
    """A 64-bit generator seed for slice `index` of tensor `name`: the same bytes whatever order tensors and
    slices are generated in, and whatever thread generates them."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


_scratch = threading.local()


def _fill_normal(out: torch.Tensor, std: float, seed: int) -> None:
    """out (1-D, at most SLICE_ELEMENTS) <- N(0, std^2). Drawn in fp32 (torch's vectorised normal fill) into a
    per-thread buffer, then rounded into `out`'s dtype: measured a little faster here than drawing bf16 directly."""
    generator = torch.Generator().manual_seed(seed)
    if out.dtype == torch.float32:
        out.normal_(0.0, std, generator=generator)
        return
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = torch.empty(SLICE_ELEMENTS, dtype=torch.float32)
    out.copy_(buffer[: out.numel()].normal_(0.0, std, generator=generator))


def _is_normal(shape: torch.Size) -> bool:
    """Random normal for matrices (2-D or more: embeddings, projections, the LM head); else a constant."""
    return len(shape) >= 2


def _constant(name: str) -> float:
    """Value of a 1-D (or 0-D) parameter: 0 for a bias (name ends in "bias"), 1 otherwise (norm scales, the only
    other vectors in these models; as transformers initialises RMSNorm and LayerNorm weights)."""
    return 0.0 if name.endswith("bias") else 1.0


def _tensor_bytes(
    specs: list[Spec], std: float, seed: int, pool: ThreadPoolExecutor, window: int
) -> Iterator[memoryview]:
    """The bytes of every tensor of `specs` in order, a slice (at most SLICE_ELEMENTS) at a time, generated on
    `pool` up to `window` slices ahead of the one yielded.

    Note [One view at a time]: a yielded view is a reused buffer. The consumer must be done with it (written it)
    before asking for the next: on resuming, its buffer goes back to the free list and is refilled by a later
    slice. Buffers: at most `window`, each SLICE_ELEMENTS of the stored dtype (all specs share one dtype).
    """
    free: list[torch.Tensor] = []

    def jobs() -> Iterator[tuple[torch.Tensor | None, torch.Tensor, Future[None] | None]]:
        """(buffer to reuse or None, the slice, its generation) for each slice, submitted as it is drawn."""
        for name, shape, dtype in specs:
            if not _is_normal(shape):
                yield None, torch.full(shape, _constant(name), dtype=dtype).view(-1), None
                continue
            numel = shape.numel()
            for index, begin in enumerate(range(0, numel, SLICE_ELEMENTS)):
                buffer = free.pop() if free else torch.empty(SLICE_ELEMENTS, dtype=dtype)
                out = buffer[: min(SLICE_ELEMENTS, numel - begin)]
                yield buffer, out, pool.submit(_fill_normal, out, std, _slice_seed(seed, name, index))

    source = jobs()
    queued = deque(itertools.islice(source, window))
    while queued:
        buffer, out, future = queued.popleft()
        if future is not None:
            future.result()  # the slice is filled (or its error re-raised) before its bytes are read
        yield memoryview(out.view(torch.uint8).numpy())
        if buffer is not None:
            free.append(buffer)  # Note [One view at a time]: the consumer wrote it before asking for more
        queued.extend(itertools.islice(source, 1))


def _specs(model: torch.nn.Module, dtype: torch.dtype) -> list[Spec]:
    """(name, shape, dtype) of every tensor save_pretrained would write: each parameter once (a tied weight
    under its first name, as transformers keeps it), in module order.

    Raises:
        ValueError: the model has persistent buffers, which this writer does not generate.
    """
    specs = [(name, param.shape, dtype) for name, param in model.named_parameters()]
    every_parameter = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = sorted(set(model.state_dict()) - every_parameter)
    if buffers:
        raise ValueError(f"{type(model).__name__} has persistent buffers ({', '.join(buffers[:3])}, ...), which "
                         "write_synthetic_model does not generate; it writes parameters only")
    return specs


# ------------------------------------------------------------------------------------------------- writing


def _cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _nbytes(spec: Spec) -> int:
    return spec[1].numel() * spec[2].itemsize


def _slice_count(spec: Spec) -> int:
    """Views `_tensor_bytes` yields for one tensor: one for a constant, one per slice for a normal."""
    numel = spec[1].numel()
    return -(-numel // SLICE_ELEMENTS) if _is_normal(spec[1]) else 1


def _write_shard(path: Path, header: bytes, views: Iterable[memoryview], syncer: ThreadPoolExecutor) -> int:
    """Write one safetensors file, `header` then `views`, and fsync it; returns the data bytes written.

    The page cache would otherwise hold the whole shard dirty (2 GiB is under the kernel's background writeback
    threshold on this machine, 10% of 24 GB) and the disk would idle until the final fsync while the CPU draws.
    So every SYNC_EVERY bytes an fsync of what is written so far starts on `syncer` (one at a time), and the
    disk writes while the next slices are drawn.
    """
    written, unsynced = 0, 0
    flushing: Future[None] | None = None
    with open(path, "wb") as file:
        file.write(header)
        try:
            for view in views:
                # write() copies the view into the page cache (or the file's buffer) before it returns: Note [One
                # view at a time] holds when the loop asks for the next view
                written += file.write(view)
                unsynced += len(view)
                if unsynced >= SYNC_EVERY and (flushing is None or flushing.done()):
                    file.flush()  # into the kernel, so that the fsync covers it
                    flushing = syncer.submit(os.fsync, file.fileno())
                    unsynced = 0
        finally:
            if flushing is not None:
                wait([flushing])  # the background fsync is done with the descriptor before the file closes
        if flushing is not None:
            flushing.result()  # re-raise its error, if any
        file.flush()
        os.fsync(file.fileno())  # the whole shard on disk before the next: the throughput printed is the disk's
    return written


def write_synthetic_model(
    config: PretrainedConfig,
    directory: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 * GiB,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write `config`'s causal LM with random weights to `directory`, as `save_pretrained` lays it out.

    Each parameter of the model transformers builds from `config` (on the meta device, so nothing is allocated)
    is generated on its own: a tensor of 2 or more dimensions is N(0, config.initializer_range^2) (0.02 when the
    config has none); a vector is zeros if its name ends in "bias", else ones (the norm scales). The draws are
    seeded per slice of SLICE_ELEMENTS from sha256(seed, name, slice index), so the same seed gives the same
    bytes whatever the thread count or shard size, and another seed different ones. A slice is written as soon
    as it is drawn: memory holds a few slices (tens of MB), never a tensor.

    Files: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`
    (metadata.total_size), `config.json` (architectures and dtype set as save_pretrained sets them), and
    `generation_config.json` when the model can generate. Everything is written into `.<name>.partial` beside
    `directory`, each shard fsync'd, and renamed to `directory` at the end: an interrupted run leaves only the
    .partial directory, which the next run removes.

    Args:
        config: a transformers config with a causal-LM class; not modified (a copy is saved).
        directory: the model directory to create; must not exist, or be empty.
        dtype: dtype of the stored weights (one of safetensors' floating dtypes).
        seed: selects the random weights.
        max_shard_bytes: a shard ends before the tensor that would take it past this; a larger tensor gets a
            shard of its own.
        threads: generation threads; default one per CPU this process may run on.
        log: receives a line per shard (shard, bytes written, elapsed, throughput); None for silence.

    Returns:
        `directory`, resolved.

    Raises:
        FileExistsError: `directory` exists and is not an empty directory.
        NotEnoughDisk: the file system has fewer free bytes than the model plus HEADROOM; the message names both.
        ValueError: the model has persistent buffers (not generated), or transformers has no causal LM for
            `config`.
    """
    directory = Path(directory).resolve()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists and is not an empty directory; remove it or pick another")
    config = copy.deepcopy(config)
    model = meta_model(config)
    specs = _specs(model, dtype)
    total = sum(map(_nbytes, specs))

    partial = directory.with_name(f".{directory.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run: its files never became a model directory
    partial.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(partial.parent).free
    if free < total + HEADROOM:
        raise NotEnoughDisk(
            f"{directory}: the model needs {total + HEADROOM} bytes ({fmt_bytes(total + HEADROOM)}) of disk, "
            f"{free} bytes ({fmt_bytes(free)}) are free on {partial.parent}; free some or write elsewhere"
        )

    partial.mkdir()
    try:
        shards = plan_shards(specs, max_shard_bytes)
        names = shard_names(len(shards))
        std = float(getattr(config, "initializer_range", 0.02))
        start, written = time.perf_counter(), 0
        workers = threads or _cpus()
        with ThreadPoolExecutor(workers, thread_name_prefix="synthetic") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="synthetic-fsync") as syncer:
            try:
                # two slices beyond one per thread: every thread busy while the main thread writes one
                slices = _tensor_bytes(specs, std, seed, pool, window=workers + 2)
                for number, (shard, name) in enumerate(zip(shards, names), 1):
                    count = sum(_slice_count(spec) for spec in shard)
                    shard_slices = itertools.islice(slices, count)
                    written += _write_shard(partial / name, encode_header(shard), shard_slices, syncer)
                    if log is not None:
                        elapsed = time.perf_counter() - start
                        log(f"shard {number}/{len(shards)}: {fmt_bytes(written)} of {fmt_bytes(total)} written, "
                            f"{elapsed:.1f} s, {written / GiB / max(elapsed, 1e-9):.2f} GiB/s")
            finally:
                pool.shutdown(cancel_futures=True)  # on an error, drop the slices not started

        if len(shards) > 1:
            index = shard_index(shards, names)
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.architectures = [type(model).__name__]
        config.dtype = dtype  # what from_pretrained(dtype="auto") loads as
        config.save_pretrained(partial)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(partial)
        if directory.exists():
            directory.rmdir()  # checked empty above
        os.replace(partial, directory)  # one rename: the directory appears complete or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


# ------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("out", type=Path, help="model directory to create (must not exist)")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers instead of the preset's")
    parser.add_argument("--seed", type=int, default=0, help="selects the random weights (default 0)")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="largest shard, GiB (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="generation threads (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    config = PRESETS[args.preset]()
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    params = sum(param.numel() for param in meta_model(config).parameters())
    print(f"{args.preset} ({config.num_hidden_layers} layers): {params:,} parameters -> {args.out}", flush=True)
    clock = CpuClock()
    start = time.perf_counter()
    try:
        write_synthetic_model(
            config,
            args.out,
            seed=args.seed,
            max_shard_bytes=int(args.max_shard_gib * GiB),
            threads=args.threads,
            log=lambda line: print(line, flush=True),
        )
    except (FileExistsError, NotEnoughDisk) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    cpu = clock.lap()  # on a shared machine, how much of the CPU others took meanwhile
    written = sum(path.stat().st_size for path in args.out.iterdir())
    shards = len(list(args.out.glob("*.safetensors")))
    print(f"{params:,} parameters, {written:,} bytes ({fmt_bytes(written)}) in {shards} shard(s), "
          f"{seconds:.1f} s, {written / GiB / seconds:.2f} GiB/s; CPU s: {cpu['own']:.1f} own, "
          f"{cpu['others']:.1f} other processes", flush=True)
    print(json.dumps({
        "preset": args.preset, "layers": config.num_hidden_layers, "seed": args.seed, "parameters": params,
        "bytes": written, "shards": shards, "seconds": round(seconds, 2),
        "gib_per_s": round(written / GiB / seconds, 3), "threads": args.threads or _cpus(),
        "cpu_s_own": round(cpu["own"], 1), "cpu_s_others": round(cpu["others"], 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
