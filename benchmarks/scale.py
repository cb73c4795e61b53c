"""The big runs: models far beyond this machine's RAM, a few steps each, beside the planner's predictions.

    python benchmarks/scale.py                       # every row (about half an hour, ~70 GB of disk at the most)
    python benchmarks/scale.py --rows 13b-lora       # one row
    python benchmarks/scale.py --preset llama-tiny   # every row on a tiny model: a check of the script itself

Rows (issue 12): full fine-tuning of a 7B Llama with 8-bit AdamW, state on NVMe; MeZO on a 13B Llama (weights
stored in bf16 with stochastic rounding, `--storage-dtype bf16`: fp32 would need 48 GiB of swap); LoRA and
QLoRA on a 13B Llama with the base read from its own safetensors. Models are written synthetically
(`synthetic_model.py`, bf16 shards, layer by layer) into --workdir and deleted when the next row needs another.

For each row the planner runs first (`offload.predict`, this machine's rates from `offload.measure_machine`). If
the model file and the swap files it predicts do not fit the free disk, the row runs the largest number of
layers of the same shape that does, and says so; if the budget is below the engine's minimum, the row runs at
the minimum and says so. Then a fresh child process builds the engine and trains: peak RSS (VmHWM), time to the
end of the first step, median step time of the rest, NVMe and safetensors bytes per step. The two floors: the
step's FLOPs at the measured FLOP/s, and its bytes at the measured disk rates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from synthetic_model import PRESETS, write_synthetic_model  # noqa: E402

ROWS: dict[str, dict[str, Any]] = {  # in an order that writes each model once
    "13b-lora": {"preset": "llama-13b", "optimizer": "adamw", "lora": "lora"},
    "13b-qlora": {"preset": "llama-13b", "optimizer": "adamw", "lora": "qlora"},
    "13b-mezo": {"preset": "llama-13b", "optimizer": "mezo", "lora": None},
    "7b-adamw8bit": {"preset": "llama-7b", "optimizer": "adamw8bit", "lora": None},
}
DISK_MARGIN = 8 * common.GiB  # left free beyond the predicted files, for whatever else writes meanwhile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--preset", default=None, help="run every row on this preset instead (e.g. llama-tiny)")
    parser.add_argument("--memory", default="4GB", help="device + host budget (split: each tier its minimum, the "
                                                          "rest evenly), as `finetune run --memory`")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="steps per row: the first, then the timed ones")
    parser.add_argument("--workdir", default="/tmp/finetune-scale", help="models and swap files (a real disk)")
    parser.add_argument("--name", default="scale", help="results file benchmarks/results/<name>.json")
    parser.add_argument("--plan-only", action="store_true", help="print each row's plan; write and train nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _optimizer(name: str) -> Any:
    from finetune import optim

    return {"adamw": lambda: optim.AdamW(lr=1e-4), "adamw8bit": lambda: optim.AdamW8bit(lr=1e-5),
            "mezo": lambda: optim.MeZO(lr=1e-6, storage_dtype=torch.bfloat16)}[name]()


def _budget(model: torch.nn.Module, optimizer: Any, quantize: str | None, memory: int) -> tuple[int, int, str]:
    """(device, host, note): --memory split as `finetune run` splits it, or the minimum when it is below."""
    from finetune import offload

    device, host = offload.Engine.minimum_budget(model, optimizer, compute_dtype=torch.float32,
                                                 quantize_frozen=quantize)
    if device + host > memory:
        return device, host, (f"budget {common.fmt_bytes(memory)} is below this model's minimum "
                              f"{common.fmt_bytes(device + host)}: run at the minimum")
    spare = memory - device - host
    return device + spare // 2, host + spare - spare // 2, ""


def plan(row: dict[str, Any], config: Any, args: argparse.Namespace, free: int) -> dict[str, Any]:
    """The planner's prediction for `row`, and the budget and layer count it runs with."""
    from finetune import offload

    optimizer = _optimizer(row["optimizer"])
    quantize = "nf4" if row["lora"] == "qlora" else None
    model = common.meta_model(config, lora=row["lora"] is not None)
    device, host, note = _budget(model, optimizer, quantize, offload.parse_size(args.memory))
    shape = (args.batch * args.seq, config.hidden_size, config.intermediate_size)
    machine = offload.measure_machine(Path(args.workdir), torch.float32, shape, optimizer=optimizer,
                                      progress=print)
    workload = offload.Workload(batch_size=args.batch, seq_len=args.seq, updates_in_backward=True,
                                frozen_file_dtype=torch.bfloat16 if row["lora"] else None,
                                quantize_frozen=quantize)
    prediction = offload.predict(model, optimizer, workload, machine, device_budget=device, host_budget=host,
                                 nvme=True, compute_dtype=torch.float32)
    file_bytes = 2 * sum(p.numel() for p in offload.meta_model(config).parameters())  # bf16 shards
    return {"device": device, "host": host, "note": note, "prediction": prediction, "machine": machine,
            "disk_needed": file_bytes + prediction.traffic.swap_bytes, "free": free}


def fitting_config(row: dict[str, Any], args: argparse.Namespace, free: int) -> tuple[Any, dict[str, Any], str]:
    """The row's config, or the same shape with the most layers whose files fit `free` disk bytes."""
    config = PRESETS[args.preset or row["preset"]]()
    planned = plan(row, config, args, free)
    reason = ""
    while planned["disk_needed"] + DISK_MARGIN > free and config.num_hidden_layers > 2:
        if not reason:
            reason = (f"{row['preset']} needs {common.fmt_bytes(planned['disk_needed'])} of disk (model file + "
                      f"swap), {common.fmt_bytes(free)} free: ran the most layers that fit")
        config.num_hidden_layers -= 1
        planned = plan(row, config, args, free)
    return config, planned, reason


def child(spec: dict[str, Any]) -> None:
    """One row in this fresh process; prints its JSON result as the last line."""
    from transformers import AutoConfig

    from finetune import offload

    started = time.perf_counter()
    common.quiet_transformers()
    model_dir = Path(spec["model"])
    model = common.meta_model(AutoConfig.from_pretrained(model_dir), lora=spec["lora"] is not None)
    budget = offload.Budget(device=spec["device"], host=spec["host"], nvme=spec["swap"])
    engine = offload.Engine(model, _optimizer(spec["optimizer"]), budget, weights=model_dir, device="cpu",
                            quantize_frozen="nf4" if spec["lora"] == "qlora" else None)
    built = time.perf_counter() - started
    batches = common.random_batches(spec["steps"], spec["batch"], spec["seq"], model.config.vocab_size, seed=0)
    times, moved, disk = [], [], []
    with engine:
        for batch in batches:
            read, written, io = engine.store.bytes_read, engine.store.bytes_written, _disk_io()
            _, seconds = common.timed(engine.train_step, batch)
            times.append(seconds)
            moved.append((engine.store.bytes_read - read, engine.store.bytes_written - written))
            disk.append(tuple(now - before for now, before in zip(_disk_io(), io)))
            print(f"  step {len(times)}: {seconds:.1f} s, RSS {common.fmt_bytes(common.rss())}", flush=True)
    later, disk = moved[1:] or moved, disk[1:] or disk
    print(json.dumps({"built_s": built, "first_step_s": built + times[0], "step_s": common.median(times[1:] or times),
                      "peak_rss": common.max_rss_rusage(), "read": sum(m[0] for m in later) / len(later),
                      "written": sum(m[1] for m in later) / len(later),
                      "disk_read": sum(d[0] for d in disk) / len(disk),
                      "disk_written": sum(d[1] for d in disk) / len(disk)}))


def _disk_io() -> tuple[int, int]:
    """(read, written) bytes this process made the block devices move (/proc/self/io): a frozen base read in
    bf16 into fp32 chunks counts its file's bytes here, its chunks' bytes in the store's counters."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    row = ROWS[name]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("swap-*"):
        shutil.rmtree(stale)
    config, planned, reason = fitting_config(row, args, shutil.disk_usage(work).free + _model_bytes(work))
    if args.plan_only:
        p = planned["prediction"]
        print(f"{name}: {config.num_hidden_layers} layers, step {p.step_s:.0f} s ({p.bottleneck}), peak RSS "
              f"{common.fmt_bytes(p.peak_rss)}, read / written {common.fmt_bytes(p.traffic.disk_read)} / "
              f"{common.fmt_bytes(p.traffic.disk_write)} per step, busy "
              f"{ {k: round(v, 1) for k, v in p.busy_s.items()} }, disk {common.fmt_bytes(planned['disk_needed'])}"
              + (f"; {planned['note']}" if planned["note"] else "") + (f"; {reason}" if reason else ""))
        return {}
    model_dir = work / f"{args.preset or row['preset']}-{config.num_hidden_layers}"
    for other in work.glob("llama-*"):
        if other != model_dir:
            shutil.rmtree(other)  # one model on disk at a time
    if not model_dir.exists():
        write_synthetic_model(config, model_dir, log=print)
    print(f"{name}: {config.num_hidden_layers} layers, budget device {common.fmt_bytes(planned['device'])} + host "
          f"{common.fmt_bytes(planned['host'])}" + (f"; {planned['note']}" if planned["note"] else "")
          + (f"; {reason}" if reason else ""), flush=True)
    spec = {**row, "model": str(model_dir), "swap": str(work / f"swap-{name}"), "device": planned["device"],
            "host": planned["host"], "batch": args.batch, "seq": args.seq, "steps": args.steps}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                         check=True)
    print("\n".join(out.stdout.strip().splitlines()[:-1]))
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return _result(name, config, planned, measured, reason)


def _model_bytes(work: Path) -> int:
    """Bytes of the models in `work` that this row may delete (they count as free for its plan)."""
    return sum(f.stat().st_size for d in work.glob("llama-*") for f in d.rglob("*") if f.is_file())


def _result(name: str, config: Any, planned: dict[str, Any], measured: dict[str, Any], reason: str) -> dict[str, Any]:
    prediction, machine = planned["prediction"], planned["machine"]
    compute_floor = prediction.flops / machine.flops
    # The disk's own bytes (/proc/self/io): a bf16 base read into fp32 chunks moves half the chunks' bytes.
    io_floor = measured["disk_read"] / machine.disk_read + measured["disk_written"] / machine.disk_write
    return {
        "row": name, "layers": config.num_hidden_layers, "reason": reason, "note": planned["note"],
        "params": sum(p.numel() for p in common.meta_model(config).parameters()),
        "budget": planned["device"] + planned["host"], "measured": measured,
        "predicted": {"step_s": prediction.step_s, "peak_rss": prediction.peak_rss,
                      "read": prediction.traffic.disk_read, "written": prediction.traffic.disk_write,
                      "bottleneck": prediction.bottleneck, "busy_s": prediction.busy_s,
                      "disk_needed": planned["disk_needed"]},
        "compute_floor_s": compute_floor, "io_floor_s": io_floor, "machine": machine.__dict__,
    }


def main(args: argparse.Namespace) -> None:
    results, failed = [], {}
    for name in args.rows.split(","):
        try:
            result = run_row(name, args)
        except subprocess.CalledProcessError as error:  # one row failing (a full disk, say) leaves the others
            failed[name] = f"child exited with {error.returncode}"
            print(f"{name}: FAILED ({failed[name]})", flush=True)
            continue
        if result:
            results.append(result)
            common.write_results(args.name, {"hardware": common.hardware(), "rows": results, "failed": failed})
    if args.plan_only:
        return
    rows = []
    for r in results:
        m, p = r["measured"], r["predicted"]
        rows.append([r["row"], f"{r['params'] / 1e9:.2f}B", common.fmt_bytes(r["budget"]),
                     f"{common.fmt_bytes(m['peak_rss'])} ({p['peak_rss'] / m['peak_rss']:.2f})",
                     f"{m['first_step_s']:.0f} s", f"{m['step_s']:.1f} s ({p['step_s'] / m['step_s']:.2f})",
                     f"{common.fmt_bytes(m['disk_read'])} / {common.fmt_bytes(m['disk_written'])}",
                     f"{p['read'] / max(m['disk_read'], 1):.2f} / {p['written'] / max(m['disk_written'], 1):.2f}",
                     f"{m['step_s'] / r['compute_floor_s']:.2f}x / {m['step_s'] / max(r['io_floor_s'], 1e-9):.2f}x"])
    print(common.table(["row", "params", "budget", "peak RSS (pred/meas)", "to 1st step", "step (pred/meas)",
                        "disk read / written per step", "pred/meas", "step / compute, I/O floor"], rows))
    for r in results:
        for text in (r["note"], r["reason"]):
            if text:
                print(f"{r['row']}: {text}")
    print(common.hardware_line(common.hardware()))
    written = common.write_results(args.name, {"hardware": common.hardware(), "rows": results, "failed": failed})
    print(f"wrote {written}")


if __name__ == "__main__":
    arguments = parse_args()
    common.child_or_parent(arguments, child, main)
