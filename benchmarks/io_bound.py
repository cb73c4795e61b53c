"""The I/O-bound row: how close the chunk store's streaming comes to the disk's own O_DIRECT bandwidth, no compute.

    python benchmarks/io_bound.py              # 5 GiB of chunks through a 512 MiB host budget (~2 min)
    python benchmarks/io_bound.py --quick      # 1 GiB in 16 MiB chunks through 96 MiB (~20 s)

Issue 13's measure: every benchmark of a training step here is compute-bound (the disk 18-22% busy), so none
shows whether the store itself can keep the disk busy. Here a state of `--total` bytes in chunks of `--chunk`
bytes, at least 10x the host budget, streams through a `ChunkStore` (CPU transport, the thread-pool NVMe backend
the engine uses): a write pass (each chunk filled and released dirty, so making room writes it back; then a
flush), and read passes in order with `--prefetch` chunks prefetched ahead, as the engine's layers stream. Beside
them, alternating in the same process so the disk's drift falls on both, the raw rates: one file of the same
size written and read with the same backend in 8 MiB O_DIRECT requests, 4 at a time, with no store. Two write
passes: the first creates the swap files (the raw file's blocks are allocated already), the second rewrites them,
as every step after the first does. The goal is a store / raw ratio >= 0.90 each way in the steady state. Every
chunk read is checked against what was written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import fmt_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 GiB in 16 MiB chunks through a 96 MiB budget")
    parser.add_argument("--total", default="5GB", help="bytes of chunks streamed (MB/GB are binary)")
    parser.add_argument("--chunk", default="64MB", help="bytes per chunk (a large layer's chunk)")
    parser.add_argument("--host-budget", default="512MB", help="ChunkStore host budget")
    parser.add_argument("--prefetch", type=int, default=2, help="chunks prefetched ahead of the one read")
    parser.add_argument("--passes", type=int, default=3, help="read passes (each beside a raw read)")
    parser.add_argument("--workdir", default="/tmp", help="where the swap files go (a real disk)")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.total, args.host_budget, args.chunk = "1GB", "96MB", "16MB"
    return args


def main() -> None:
    from finetune import offload

    args = parse_args()
    total, chunk_bytes = offload.parse_size(args.total), offload.parse_size(args.chunk)
    budget = offload.parse_size(args.host_budget)
    count = total // chunk_bytes
    if count * chunk_bytes < 10 * budget:
        raise SystemExit(f"--total {args.total} is under 10x --host-budget {args.host_budget}: raise --total")
    workdir = Path(tempfile.mkdtemp(prefix="io_bound-", dir=args.workdir))
    try:
        result = _measure(workdir, count, chunk_bytes, budget, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _report(result)
    common.write_results(args.name or ("io_bound_quick" if args.quick else "io_bound"),
                         {"benchmark": "io_bound", "quick": args.quick, **result})


def _measure(workdir: Path, count: int, chunk_bytes: int, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    from finetune import offload
    from finetune.offload.chunks import Tier
    from finetune.offload.device import Transport
    from finetune.offload.store import ChunkStore

    numel = chunk_bytes // 4
    raw_writes, raw_reads, store_reads = [], [], []
    with offload.ThreadPoolBackend(workdir / "store") as backend, \
            offload.ThreadPoolBackend(workdir / "raw") as raw_backend:
        store = ChunkStore(0, budget, Transport(torch.device("cpu")), backend)
        chunks = [store.create(f"c{i}", numel, torch.float32, chunk_bytes) for i in range(count)]
        raw = raw_backend.open("raw", count * chunk_bytes)
        buffer = offload.aligned_empty(budget)
        buffer.random_(0, 256)  # incompressible

        raw_writes.append(_timed_raw(raw, buffer, count * chunk_bytes, write=True))  # allocates its blocks
        store_writes = []
        for write_pass in range(2):  # the first creates and allocates the swap files; the second rewrites them
            raw_writes.append(_timed_raw(raw, buffer, count * chunk_bytes, write=True))
            started = time.perf_counter()
            for i, chunk in enumerate(chunks):  # dirty every chunk: making room writes the older ones back
                store.discard(chunk)  # its old bytes are not needed (as a gradient's): no read before the write
                store.acquire(chunk, Tier.HOST).fill_(float(i + write_pass))
                store.release(chunk, Tier.HOST, dirty=True)
            store.flush()
            store_writes.append(count * chunk_bytes / (time.perf_counter() - started))
            kind = "new files" if write_pass == 0 else "rewrite"
            print(f"  write ({kind}): store {fmt_bytes(store_writes[-1])}/s, raw {fmt_bytes(raw_writes[-1])}/s",
                  flush=True)

        for _ in range(args.passes):
            raw_reads.append(_timed_raw(raw, buffer, count * chunk_bytes, write=False))
            read_before = store.bytes_read
            started = time.perf_counter()
            for i, chunk in enumerate(chunks):
                for ahead in chunks[i + 1 : i + 1 + args.prefetch]:
                    store.prefetch(ahead, Tier.HOST)
                data = store.acquire(chunk, Tier.HOST)
                if data[0].item() != float(i + 1) or data[-1].item() != float(i + 1):
                    raise SystemExit(f"chunk {i} read back other bytes than were written")
                store.release(chunk, Tier.HOST)
            seconds = time.perf_counter() - started
            store_reads.append(count * chunk_bytes / seconds)
            print(f"  read: store {fmt_bytes(store_reads[-1])}/s ({fmt_bytes(store.bytes_read - read_before)} from "
                  f"disk), raw {fmt_bytes(raw_reads[-1])}/s", flush=True)
        store.close()
    return {
        "hardware": common.hardware(), "direct": backend.direct, "chunks": count, "chunk_bytes": chunk_bytes,
        "host_budget": budget, "prefetch": args.prefetch, "store_write_Bps": store_writes,
        "raw_write_Bps": raw_writes[1:], "store_read_Bps": store_reads, "raw_read_Bps": raw_reads,
    }


def _timed_raw(file: Any, buffer: torch.Tensor, nbytes: int, *, write: bool) -> float:
    """Bytes per second of writing (then fsyncing) or reading `nbytes` of `file`, a buffer's worth at a time."""
    started = time.perf_counter()
    for offset in range(0, nbytes, buffer.numel()):
        piece = buffer[: min(buffer.numel(), nbytes - offset)]
        (file.write_from(piece, offset) if write else file.read_into(piece, offset)).result()
    if write:
        file.sync()
    return nbytes / (time.perf_counter() - started)


def _report(result: dict[str, Any]) -> None:
    print(f"\nMachine: {common.hardware_line(result['hardware'])}")
    print(f"{result['chunks']} chunks of {fmt_bytes(result['chunk_bytes'])} through a "
          f"{fmt_bytes(result['host_budget'])} host budget, prefetch {result['prefetch']}, O_DIRECT {result['direct']}")
    (new_store, rewrite_store), (new_raw, rewrite_raw) = result["store_write_Bps"], result["raw_write_Bps"]
    read_raw, read_store = common.median(result["raw_read_Bps"]), common.median(result["store_read_Bps"])
    rows = [["write, new swap files", f"{fmt_bytes(new_store)}/s", f"{fmt_bytes(new_raw)}/s",
             f"{new_store / new_raw:.2f}"],
            ["write, rewrite (steady state)", f"{fmt_bytes(rewrite_store)}/s", f"{fmt_bytes(rewrite_raw)}/s",
             f"{rewrite_store / rewrite_raw:.2f}"],
            ["read, in order, prefetched (median)", f"{fmt_bytes(read_store)}/s", f"{fmt_bytes(read_raw)}/s",
             f"{read_store / read_raw:.2f}"]]
    print(common.table(["pass", "store", "raw O_DIRECT", "store / raw"], rows))


if __name__ == "__main__":
    main()
