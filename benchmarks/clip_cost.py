"""What exact gradient clipping costs a step on the memory_bound model (state on NVMe), now that it speculates.

    python benchmarks/clip_cost.py            # memory_bound's model and budget (~277M params, 1 GiB of RAM)
    python benchmarks/clip_cost.py --quick    # its --quick shapes (~30 s)

Exact clipping runs every block's update inside backward as if no clipping were needed, keeping what it overwrites
as swap-file versions, and validates the step once the global norm is known (offload/updates.py, Note [Speculative
updates]). Three engines over the same model train side by side in one fresh process, their steps alternating so
that the VM's drift falls on all: (a) no clipping, (b) exact clipping with a max_grad_norm no step reaches (every
step commits what ran in backward), (c) exact clipping with a tiny max_grad_norm (every step is rolled back and
redone clipped after backward: the old cost of exact clipping, plus the rollback). The goal: (b) <= 1.03 x (a).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_bound  # noqa: E402
from common import fmt_bytes  # noqa: E402

ENGINES = {"(a) no clipping": None, "(b) exact, never clipped": 1e9, "(c) exact, always clipped": 1e-9}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return memory_bound.saved_model_args(__doc__, argv, steps=5, workdir_help="model and swap files (a real disk)")


def main_parent(args: argparse.Namespace) -> None:
    memory_bound.measure_on_saved_model(args, __file__, "clip_cost", report)


def report(result: dict[str, Any]) -> None:
    engines = result["engines"]
    base = common.median(engines["(a) no clipping"]["step_times_s"])
    print(f"\nMachine: {common.hardware_line(result['hardware'])}")
    print(f"Model:   Llama {result['layers']} layers, {result['params'] / 1e6:.1f}M params, AdamW fp32, state on NVMe")
    rows = []
    for name, engine in engines.items():
        median = common.median(engine["step_times_s"])
        rows.append([name, f"{median:.3f} s", f"{median / base:.3f}", fmt_bytes(engine["written_per_step"]),
                     fmt_bytes(engine["read_per_step"]), str(engine["redone_steps"])])
    print(common.table(["engine", "median step", "/ (a)", "swap written/step", "swap read/step", "steps redone"],
                       rows))


def main_child(spec: dict[str, Any]) -> None:
    """The three engines, steps alternating; the result goes to spec['result_path']."""
    from finetune import offload, optim

    common.quiet_transformers()
    workdir = Path(spec["workdir"])
    batches = common.random_batches(1 + spec["steps"], spec["batch"], spec["seq"], spec["vocab"], spec["seed"])
    engines = {}
    for index, (name, max_grad_norm) in enumerate(ENGINES.items()):
        budget = offload.Budget(device=spec["device_budget"], host=spec["host_budget"], nvme=workdir / f"swap{index}")
        engines[name] = offload.Engine.from_pretrained(workdir / "model", optim.AdamW(lr=1e-4), budget,
                                                       prefetch=spec["prefetch"], max_grad_norm=max_grad_norm)
    times: dict[str, list[float]] = {name: [] for name in engines}
    moved = {name: [0, 0] for name in engines}
    for index, batch in enumerate(batches):
        for name, engine in engines.items():
            before = engine.stats()
            _, seconds = common.timed(engine.train_step, batch)
            after = engine.stats()
            if index:  # the first step of each is its warm-up
                times[name].append(seconds)
                moved[name][0] += after["bytes_written"] - before["bytes_written"]
                moved[name][1] += after["bytes_read"] - before["bytes_read"]
            print(f"  {name} step {index + 1}: {seconds:.3f} s", flush=True)
    result: dict[str, Any] = {"hardware": common.hardware(), "engines": {}}
    for name, engine in engines.items():
        count = max(len(times[name]), 1)
        result["engines"][name] = {"max_grad_norm": ENGINES[name], "step_times_s": times[name],
                                   "written_per_step": moved[name][0] / count, "read_per_step": moved[name][1] / count,
                                   "redone_steps": engine.stats()["redone_steps"]}
        engine.close()
    Path(spec["result_path"]).write_text(json.dumps(result))


def main() -> None:
    common.child_or_parent(parse_args(), main_child, main_parent)


if __name__ == "__main__":
    main()
