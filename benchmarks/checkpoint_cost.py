"""What a checkpoint costs on the memory_bound model, against one training step, and what verified swap reads cost.

    python benchmarks/checkpoint_cost.py            # memory_bound's model and budget (~277M params, 1 GiB of RAM)
    python benchmarks/checkpoint_cost.py --quick    # its --quick shapes (~20 s)

Issue 16's measure: a checkpoint's bytes written and wall time, as a fraction of one step (goal <= 0.1 where the
state already lives on NVMe). Two engines over the same model train side by side in one fresh process, their steps
alternating so that the VM's drift falls on both: (a) as `finetune run` trains, (b) the same with
`verify_swap=True` (every swap read checked against the XXH3 of what was written). Then each saves a checkpoint in
swap (`finetune run`'s default with --nvme: what is only in memory is flushed, the swap versions committed), takes
one more step (its writes go to new versions: the disk the kept checkpoint holds, and what that step costs), and
(a) then saves a portable checkpoint (the full copy of weights and optimizer state, with checksums), for
comparison: bytes, seconds, and the checksum pass of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_bound  # noqa: E402
from common import fmt_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return memory_bound.saved_model_args(__doc__, argv, steps=3,
                                         workdir_help="model, swap files and checkpoints (a real disk)")


def main_parent(args: argparse.Namespace) -> None:
    memory_bound.measure_on_saved_model(args, __file__, "checkpoint_cost", report)


def report(result: dict[str, Any]) -> None:
    plain, verified = result["engines"]["plain"], result["engines"]["verify_swap"]
    step = common.median(plain["step_times_s"])
    print(f"\nMachine: {common.hardware_line(result['hardware'])}")
    print(f"Model:   Llama {result['layers']} layers, {result['params'] / 1e6:.1f}M params, AdamW fp32, state on NVMe")
    rows = []
    for name, engine in (("(a) as finetune run", plain), ("(b) verify_swap=True", verified)):
        median = common.median(engine["step_times_s"])
        rows.append([name, f"{median:.3f} s", f"{median / step:.3f}", fmt_bytes(engine["read_per_step"])])
    print(common.table(["engine", "median step", "/ (a)", "swap read/step"], rows))
    rows = []
    for label, name, kind in (("(a) in swap", "plain", "in_swap"), ("(b) in swap", "verify_swap", "in_swap"),
                              ("(a) portable (full copy)", "plain", "portable")):
        engine = result["engines"][name]
        saved, median = engine[kind], common.median(engine["step_times_s"])
        after = saved.get("next_step_s")
        rows.append([label, fmt_bytes(saved["bytes"]), f"{saved['seconds']:.3f} s", f"{saved['seconds'] / median:.3f}",
                     fmt_bytes(saved["disk_held"]) if "disk_held" in saved else "-",
                     f"{after / median:.3f}" if after else "-",
                     f"{saved['checksum_seconds']:.2f} s" if "checksum_seconds" in saved else "at write"])
    print(common.table(["checkpoint", "bytes written", "time", "/ step", "disk it holds after a step",
                        "next step / step", "checksums"], rows))


def main_child(spec: dict[str, Any]) -> None:
    """Both engines, steps alternating, then the checkpoints; the result goes to spec['result_path']."""
    from finetune import offload, optim

    common.quiet_transformers()
    workdir = Path(spec["workdir"])
    batches = common.random_batches(2 + spec["steps"], spec["batch"], spec["seq"], spec["vocab"], spec["seed"])
    engines = {}
    for name, verify in (("plain", False), ("verify_swap", True)):
        budget = offload.Budget(device=spec["device_budget"], host=spec["host_budget"], nvme=workdir / "swap")
        engines[name] = offload.Engine.from_pretrained(workdir / "model", optim.AdamW(lr=1e-4), budget,
                                                       prefetch=spec["prefetch"], verify_swap=verify)
    times: dict[str, list[float]] = {name: [] for name in engines}
    reads: dict[str, int] = {}
    for index, batch in enumerate(batches[:-1]):
        for name, engine in engines.items():
            before = engine.stats()["bytes_read"]
            _, seconds = common.timed(engine.train_step, batch)
            if index:  # the first step of each is its warm-up
                times[name].append(seconds)
                reads[name] = reads.get(name, 0) + engine.stats()["bytes_read"] - before
            print(f"  {name} step {index + 1}: {seconds:.3f} s", flush=True)
    result: dict[str, Any] = {"hardware": common.hardware(), "engines": {}}
    for name, engine in engines.items():
        result["engines"][name] = {"step_times_s": times[name],
                                   "read_per_step": reads[name] / max(len(times[name]), 1),
                                   "in_swap": _in_swap(engine, workdir / f"in-swap-{name}", batches[-1])}
    plain = engines["plain"]
    directory = workdir / "portable"
    _, seconds = common.timed(plain.save_checkpoint, directory, portable=True)
    result["engines"]["plain"]["portable"] = {"seconds": seconds, "bytes": _bytes(directory),
                                              "checksum_seconds": _checksum_seconds(directory)}
    for engine in engines.values():
        engine.close()
    Path(spec["result_path"]).write_text(json.dumps(result))


def _in_swap(engine: Any, directory: Path, batch: Any) -> dict[str, Any]:
    """A checkpoint in swap: its seconds and bytes written (the flush and its directory), then one more step: its
    seconds, and the disk the kept checkpoint then holds beside the chunks' current files."""
    written, disk = engine.stats()["bytes_written"], _allocated(engine.swap_directory)
    _, seconds = common.timed(engine.save_checkpoint, directory)
    flushed = engine.stats()["bytes_written"] - written
    _, next_step = common.timed(engine.train_step, batch)
    held = _allocated(engine.swap_directory) - disk
    print(f"  checkpoint in swap: {seconds:.3f} s, {fmt_bytes(flushed)} flushed; next step {next_step:.3f} s",
          flush=True)
    return {"seconds": seconds, "bytes": flushed + _bytes(directory), "next_step_s": next_step, "disk_held": held}


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def _checksum_seconds(directory: Path) -> float:
    """Seconds of the checksum pass over a checkpoint's files (what save_checkpoint spends on it)."""
    from finetune.offload import CHECKSUMS_FILE, checksum_file

    started = time.perf_counter()
    for path in directory.rglob("*"):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            checksum_file(path)
    return time.perf_counter() - started


def main() -> None:
    common.child_or_parent(parse_args(), main_child, main_parent)


if __name__ == "__main__":
    main()
