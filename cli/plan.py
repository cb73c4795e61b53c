"""`finetune plan` and `finetune run --dry-run`: what a run will cost, before a byte is written.

The numbers are the cost model's (`offload.predict`): memory per tier and outside the budgets, disk for swap
and checkpoints, bytes per link per step, each resource's busy time and the step time with its bottleneck. The
knobs the user leaves open are the planner's (`offload.choose_settings`): the prefetch depth without --prefetch,
and on CPU the split of --memory between the tiers without --device-memory/--host-memory; `run` uses them. The
rates are this machine's, measured once and cached (`offload.measure_machine`), or a hardware profile's
(`--hardware`), so a plan can answer for a machine we do not have. The model needs only its config.json: it is
built on the meta device, so planning a 70B run takes seconds and no memory.

A plan that cannot run (a budget below the minimum, a state larger than memory without --nvme, swap or
checkpoints larger than the free disk) is an expected failure: one `Error:` line with the numbers, exit 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ..offload import (
    DEFAULT_PREFETCH,
    ActivationMode,
    Budget,
    ClipMode,
    Engine,
    Machine,
    Prediction,
    Workload,
    choose_settings,
    detect_hardware,
    find_blocks,
    format_bytes,
    hardware_profile,
    measure_machine,
    profile_names,
    vertical_blocker,
)
from .config import ConfigError, OptimizerName, RunConfig, StorageDtype
from .engine_options import compute_dtype, make_optimizer, quantize_frozen
from .errors import FinetuneError
from .hardware import run_budget
from .lora import wrap_lora
from .model import build_meta_model, has_safetensors, resolve_model, stored_dtype

__all__ = ["NO_DATASET", "Plan", "load_profile", "make_plan", "plan_dict", "plan_model", "plan_table", "problems",
           "summary_line"]

NO_DATASET = "(none: a plan reads no data)"
"""DATASET for `finetune plan` without one: the plan needs only --batch-size and --seq-len."""

@dataclass(frozen=True)
class Plan:
    """A run's predicted costs, with what the disks have free, for the table, --json and the checks."""

    config: RunConfig
    machine: Machine
    prediction: Prediction
    compute_dtype: torch.dtype
    device_minimum: int
    host_minimum: int
    swap_free: int | None  # free bytes at --nvme (None without it)
    checkpoint_bytes: int  # one portable checkpoint: trainable weights (fp32) and optimizer state
    in_swap_bytes: int  # the most one checkpoint in swap holds there: the chunks it references
    output_free: int
    prefetch: int  # the depth the run uses: --prefetch, or the planner's
    budget: Budget  # the budgets the run uses: the flags', with the planner's split of --memory on CPU
    chosen: tuple[str, ...]  # what the planner chose: "prefetch", "split"


def load_profile(name_or_file: str) -> Machine:
    """The machine `--hardware` names: a bundled profile or a JSON file.

    Raises:
        ConfigError: neither (a usage error), with the profile names.
    """
    try:
        return hardware_profile(name_or_file)
    except (ValueError, TypeError, OSError) as error:
        raise ConfigError(f"--hardware {name_or_file}: {error} (profiles: {', '.join(profile_names())})") from None


def plan_model(config: RunConfig) -> tuple[nn.Module, Path]:
    """The model `config` trains, on the meta device and LoRA-wrapped as `run` wraps it, and its directory, which
    may hold only config.json.

    Raises:
        FinetuneError: no such model, or one the engine cannot stream.
    """
    model_dir = resolve_model(config.model, trust_remote_code=config.trust_remote_code, weights=False)
    model = build_meta_model(model_dir, trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = wrap_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          targets=config.lora_targets, seed=config.seed, base_name=config.model)
    return model, model_dir


def _vertical(config: RunConfig, model: nn.Module) -> bool:
    """Whether the run's engine takes the vertical schedule, as `Engine(vertical=None)` decides: where it is exact
    (activations "auto" are predicted as recompute, as below)."""
    activations = ActivationMode.RECOMPUTE if config.activations is ActivationMode.AUTO else config.activations
    return config.accumulation_steps > 1 and config.optimizer is not OptimizerName.MEZO and \
        vertical_blocker(model, find_blocks(model), activations) is None


def make_plan(config: RunConfig, model: nn.Module, model_dir: Path, profile: Machine | None, *,
              progress: Console | None = None) -> Plan:
    """Predict `config`'s run of `model` on `profile`, or on this machine (its rates measured, or cached).

    Raises:
        FinetuneError: a budget below the engine's minimum, or a state that memory cannot hold without --nvme.
    """
    cuda = profile.cuda if profile is not None else torch.cuda.is_available()
    dtype = compute_dtype(config, torch.device("cuda" if cuda else "cpu"))
    optimizer, quantize = make_optimizer(config), quantize_frozen(config)
    device_min, host_min = Engine.minimum_budget(model, optimizer, compute_dtype=dtype, quantize_frozen=quantize,
                                                 accumulation_steps=config.accumulation_steps)
    budget = run_budget(config, device_min, host_min)  # refuses a typed budget below the minimum
    machine = profile or _measure(config, model, optimizer, dtype, progress)
    device_bytes, host_bytes = _budgets(budget.device, budget.host, machine, profile is not None)
    _check_memory(config, model, optimizer, dtype, quantize, device_bytes, host_bytes, (device_min, host_min))
    workload = Workload(
        batch_size=config.batch_size, seq_len=config.seq_len, accumulation_steps=config.accumulation_steps,
        # --activations keep: no recompute, every layer's activations in memory. offload and auto are predicted as
        # recompute for now: the cost model has no activation I/O yet (its memory is about recompute's, bounded).
        recompute=config.activations is not ActivationMode.KEEP,
        prefetch=DEFAULT_PREFETCH if config.prefetch is None else config.prefetch,
        updates_in_backward=config.max_grad_norm == 0 or config.clip_mode is ClipMode.PER_BLOCK,
        # Engine: exact clipping speculates where there are swap files to keep the versions it may roll back to.
        speculative=config.max_grad_norm != 0 and config.clip_mode is ClipMode.EXACT and config.nvme is not None,
        frozen_file_dtype=stored_dtype(model) if config.lora and has_safetensors(model_dir) else None,
        quantize_frozen=quantize,
        vertical=_vertical(config, model),
    )
    # One total on CPU (device and host are one RAM): the planner splits it. Typed tiers are the user's.
    split = not machine.cuda and config.memory is not None and config.device_memory is None and \
        config.host_memory is None
    settings = choose_settings(model, optimizer, workload, machine, device_budget=device_bytes,
                               host_budget=host_bytes, nvme=config.nvme is not None, compute_dtype=dtype,
                               prefetch=config.prefetch, split=split)
    if split:
        budget = dataclasses.replace(budget, device=settings.device_budget, host=settings.host_budget)
    hardware = detect_hardware()
    swap_free = hardware.disk_free(config.nvme) if config.nvme else None
    return Plan(config, machine, settings.prediction, dtype, device_min, host_min, swap_free,
                *_checkpoint_bytes(model, optimizer, dtype, quantize), hardware.disk_free(config.output),
                settings.prefetch, budget, ("prefetch",) * (config.prefetch is None) + ("split",) * split)


def _measure(config: RunConfig, model: nn.Module, optimizer: Any, dtype: torch.dtype,
             progress: Console | None) -> Machine:
    """This machine's rates at the model's matrix shape, measured at the swap directory's nearest existing
    directory (the same disk), so planning creates nothing there."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = text.hidden_size
    shape = (config.batch_size * config.seq_len, hidden, getattr(text, "intermediate_size", None) or 4 * hidden)
    swap = None
    if config.nvme:
        swap = Path(config.nvme).expanduser().absolute()
        while not swap.exists():
            swap = swap.parent
    say = (lambda message: progress.print(message, style="dim", highlight=False)) if progress else None
    return measure_machine(swap, dtype, shape, optimizer=optimizer, progress=say)


def _budgets(device: int | None, host: int | None, machine: Machine, from_profile: bool) -> tuple[int, int]:
    """The typed budgets, with the untyped ones taken as the engine takes them (offload.Budget.resolved): 90% of
    the GPU memory (a quarter of the RAM on CPU) and half of the RAM; of the profile's machine for --hardware."""
    if from_profile and machine.ram is not None:
        default_device = int(machine.device_memory * 0.9) if machine.cuda and machine.device_memory else \
            machine.ram // 4
        return (device if device is not None else default_device, host if host is not None else machine.ram // 2)
    return Budget(device=device, host=host).resolved(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _check_memory(config: RunConfig, model: nn.Module, optimizer: Any, dtype: torch.dtype, quantize: str | None,
                  device_bytes: int, host_bytes: int, minimum: tuple[int, int]) -> None:
    """Refuse, with the numbers, budgets the engine would refuse: below a tier's floor, or (without --nvme) less
    than the whole training state."""
    for tier, have, need in (("device", device_bytes, minimum[0]), ("host", host_bytes, minimum[1])):
        if have < need:
            raise FinetuneError(
                f"the {tier} tier gets {format_bytes(have)} on this machine, below the minimum {format_bytes(need)}; "
                f"--memory {format_bytes(sum(minimum))} is the minimum for this model (pass --memory or "
                f"--{tier}-memory)"
            )
    state = Engine.state_bytes(model, optimizer, compute_dtype=dtype, quantize_frozen=quantize)
    if config.nvme is None and device_bytes + host_bytes < state:
        raise FinetuneError(
            f"the training state needs {format_bytes(state)} but the budgets give {format_bytes(device_bytes)} device "
            f"+ {format_bytes(host_bytes)} host and there is no --nvme; pass --nvme DIR on a disk with "
            f"{format_bytes(state)} free, or raise --memory to {format_bytes(state)}"
        )


def _checkpoint_bytes(model: nn.Module, optimizer: Any, dtype: torch.dtype, quantize: str | None) -> tuple[int, int]:
    """One checkpoint, portable and in swap: the trainable weights (fp32 in a portable one, as stored in swap) and
    their optimizer state (LoRA: the adapters' only).

    The optimizer's share is the state less its frozen part (the state with MeZO, less MeZO's fp32 weights) and
    less the compute weights and gradients, which leaves the states and, below fp32, the masters; a checkpoint
    holds the masters, not the gradients. MeZO's portable checkpoint is fp32 weights, whatever its
    --storage-dtype; in swap it is its stored weights. A checkpoint in swap references every chunk's version: it
    holds that much disk at most, when every chunk is written again before the next one (the state streams)."""
    from .. import optim

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = 4 * trainable
    state = Engine.state_bytes(model, optimizer, compute_dtype=dtype, quantize_frozen=quantize)
    if isinstance(optimizer, optim.MeZO):
        return weights, state
    frozen = Engine.state_bytes(model, optim.MeZO(), compute_dtype=dtype, quantize_frozen=quantize) - weights
    element = torch.empty((), dtype=dtype).element_size()
    extra = state - frozen - 2 * element * trainable  # optimizer states (and masters below fp32)
    return extra + (weights if dtype == torch.float32 else 0), extra + element * trainable


def _checkpoints_kept(plan: Plan) -> tuple[int, int]:
    """How many kept checkpoints are in swap and how many portable, at most, at any moment: in swap (with --nvme,
    without --portable-checkpoints) all but a finished run's last, which is portable. --keep-checkpoints 0 keeps
    the newest until the end; --keep-best keeps one more, portable."""
    config = plan.config
    keep, best = max(config.keep_checkpoints, 1), int(config.keep_best)
    if config.nvme is None or config.portable_checkpoints:
        return 0, keep + best
    return keep, 1 + best


def problems(plan: Plan) -> list[str]:
    """Why the planned run cannot finish, each with the numbers: swap or checkpoints beyond the free disk."""
    found = []
    in_swap, portable = _checkpoints_kept(plan)
    swap = plan.prediction.traffic.swap_bytes
    held = in_swap * plan.in_swap_bytes
    if plan.swap_free is not None and swap + held > plan.swap_free:
        what = f"{format_bytes(swap)} of swap files" + (
            f" and {in_swap} checkpoints of up to {format_bytes(plan.in_swap_bytes)}" if in_swap else "")
        found.append(f"needs {format_bytes(swap + held)} on the swap path --nvme {plan.config.nvme} ({what}), "
                     f"{format_bytes(plan.swap_free)} free there; free space or choose another --nvme"
                     + (", or lower --keep-checkpoints" if in_swap else "") + _bf16_hint(plan))
    kept = plan.checkpoint_bytes * portable
    if kept > plan.output_free:
        found.append(f"{portable} checkpoints of {format_bytes(plan.checkpoint_bytes)} need "
                     f"{format_bytes(kept)} on --output {plan.config.output}, {format_bytes(plan.output_free)} free "
                     "there; " + ("lower --keep-checkpoints or " if portable > 1 else "") + "choose another --output")
    return found


def _bf16_hint(plan: Plan) -> str:
    """For a MeZO run with fp32 weights: bf16 storage about halves its swap files (its whole state is weights)."""
    config = plan.config
    if config.optimizer is not OptimizerName.MEZO or config.storage_dtype is StorageDtype.BF16:
        return ""
    return (f", or pass --storage-dtype bf16 (MeZO's weights in bf16: about "
            f"{format_bytes(plan.prediction.traffic.swap_bytes // 2)} of swap)")


def advice(plan: Plan) -> list[str]:
    """What to change, with numbers: the least --memory, the disk, and the batch that ends a transfer bottleneck."""
    prediction, config = plan.prediction, plan.config
    lines = [f"--memory {format_bytes(plan.device_minimum + plan.host_minimum)} is the minimum "
             f"(device {format_bytes(plan.device_minimum)} + host {format_bytes(plan.host_minimum)})"]
    if plan.swap_free is not None:
        short = prediction.traffic.swap_bytes > plan.swap_free
        lines.append(f"needs {format_bytes(prediction.traffic.swap_bytes)} on the swap path, "
                     f"{format_bytes(plan.swap_free)} free" + (_bf16_hint(plan) if short else ""))
    busy, bottleneck = prediction.busy_s, prediction.bottleneck
    if bottleneck in ("disk", "host-device link") and busy["compute"] > 0:
        # Compute time grows with the tokens of a step; the bytes moved do not.
        cores = 0.0 if plan.machine.cuda else busy["optimizer"]
        batch = math.ceil(config.batch_size * max(busy[bottleneck] - cores, 0.0) / busy["compute"])
        lines.append(f"{bottleneck}-bound: a larger --batch-size ({max(batch, config.batch_size + 1)}) makes it "
                     "compute-bound (activations grow with it)")
    elif bottleneck == "optimizer":
        lines.append("optimizer-bound: more --accumulation-steps spread each update over more tokens")
    elif bottleneck == "load wait":
        lines.append("load-wait-bound: blocks' loads outlast the compute prefetched ahead of them; more --memory "
                     "leaves room for a deeper --prefetch, a larger --batch-size gives each block more compute")
    return lines


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain numbers (bytes and seconds), for --json and the table."""
    p, config, traffic = plan.prediction, plan.config, plan.prediction.traffic
    in_swap, portable = _checkpoints_kept(plan)
    return {
        "machine": plan.machine.name,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        "weights_dtype": _weights_dtype(plan),
        "memory": {"device_budget": p.device_budget, "device_minimum": plan.device_minimum,
                   "host_budget": p.host_budget, "host_minimum": plan.host_minimum, "state": p.floors.state},
        "outside_budget": dict(p.outside_budget),
        "peak_rss": p.peak_rss,
        "peak_device_memory": p.peak_device_memory if plan.machine.cuda else None,
        "disk": {"nvme": config.nvme, "swap_bytes": traffic.swap_bytes if config.nvme else 0,
                 "swap_free": plan.swap_free, "output": config.output, "checkpoint_bytes": plan.checkpoint_bytes,
                 "checkpoints_kept": portable, "checkpoints_bytes": plan.checkpoint_bytes * portable,
                 "checkpoint_in_swap_bytes": plan.in_swap_bytes, "checkpoints_in_swap": in_swap,
                 "checkpoints_in_swap_bytes": plan.in_swap_bytes * in_swap, "output_free": plan.output_free},
        "io_per_step": {"disk_read": traffic.disk_read, "disk_write": traffic.disk_write,
                        "host_to_device": traffic.host_to_device, "device_to_host": traffic.device_to_host},
        "settings": {"prefetch": plan.prefetch, "chosen": list(plan.chosen)},
        "busy_s": dict(p.busy_s),
        "step_s": p.step_s,
        "tokens_per_step": p.tokens_per_step,
        "tokens_per_s": p.tokens_per_s,
        "steps": config.steps,
        "total_s": p.step_s * config.steps if config.steps else None,
        "bottleneck": p.bottleneck,
        "advice": advice(plan),
        "problems": problems(plan),
    }


def _weights_dtype(plan: Plan) -> str:
    """The dtype the trained weights are stored in: MeZO's --storage-dtype, else the compute dtype (with fp32
    masters beside them when that is not fp32)."""
    if plan.config.optimizer is OptimizerName.MEZO:
        return {StorageDtype.FP32: "float32", StorageDtype.BF16: "bfloat16"}[plan.config.storage_dtype]
    return str(plan.compute_dtype).removeprefix("torch.")


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.3g} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def _rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(section, what, value) rows of the table, from `plan_dict`'s numbers."""
    memory, disk, io = data["memory"], data["disk"], data["io_per_step"]
    rows = [
        ("memory", "device budget", f"{format_bytes(memory['device_budget'])} "
                                    f"(min {format_bytes(memory['device_minimum'])})"),
        ("memory", "host budget", f"{format_bytes(memory['host_budget'])} "
                                  f"(min {format_bytes(memory['host_minimum'])})"),
        ("memory", "training state", format_bytes(memory["state"])),
        *(("outside budget", name, format_bytes(value)) for name, value in data["outside_budget"].items()),
        ("memory", "peak RSS", format_bytes(data["peak_rss"])),
    ]
    if data["peak_device_memory"] is not None:
        rows.append(("memory", "peak GPU memory", format_bytes(data["peak_device_memory"])))
    if disk["nvme"]:
        rows.append(("disk", f"swap at {disk['nvme']}", f"{format_bytes(disk['swap_bytes'])} "
                     f"(free {format_bytes(disk['swap_free'])})"))
    if disk["checkpoints_in_swap"]:
        rows.append(("disk", "checkpoints in swap", f"{disk['checkpoints_in_swap']} x up to "
                     f"{format_bytes(disk['checkpoint_in_swap_bytes'])} (beside the swap files)"))
    what = "checkpoints" if disk["checkpoints_in_swap"] == 0 else "final checkpoint"
    rows.append(("disk", f"{what} at {disk['output']}", f"{disk['checkpoints_kept']} x "
                 f"{format_bytes(disk['checkpoint_bytes'])} (free {format_bytes(disk['output_free'])})"))
    rows += [("settings", *_setting(name, data["settings"])) for name in ("prefetch", "split")
             if name == "prefetch" or name in data["settings"]["chosen"]]
    rows += [("I/O per step", name.replace("_", " "), format_bytes(value)) for name, value in io.items() if value]
    rows += [("busy per step", name, _seconds(value)) for name, value in data["busy_s"].items()]
    rows += [("time", "step time", _seconds(data["step_s"])), ("time", "tokens/s", f"{data['tokens_per_s']:,.0f}")]
    if data["total_s"] is not None:
        rows.append(("time", f"{data['steps']} steps", _seconds(data["total_s"])))
    rows.append(("time", "bottleneck", data["bottleneck"]))
    return rows


def _setting(name: str, settings: dict[str, Any]) -> tuple[str, str]:
    """(what, value) of a knob's row: its value, and whose it is (the planner's, or the flag's)."""
    if name == "prefetch":
        return "prefetch depth", f"{settings['prefetch']} " + ("(planner's choice)" if "prefetch" in
                                                              settings["chosen"] else "(--prefetch)")
    return "device / host split", "planner's choice"


def plan_table(data: dict[str, Any]) -> Table:
    """`plan_dict`'s numbers as a rich table, advice as its caption."""
    stored = "" if data["weights_dtype"] == data["compute_dtype"] else f", weights stored in {data['weights_dtype']}"
    table = Table(title=f"finetune plan ({data['machine']}, {data['compute_dtype']}{stored})", caption_justify="left",
                  caption="\n".join(data["advice"]))
    for column in ("", "", "value"):
        table.add_column(column)
    for section, name, value in _rows(data):
        table.add_row(section, name, value)
    return table


def summary_line(plan: Plan) -> str:
    """One line for the start of `run`: step time, peak RSS, bottleneck, and the knobs the run uses."""
    p = plan.prediction
    mezo = " (MeZO)" if plan.config.optimizer is OptimizerName.MEZO else ""
    whose = "planner's choice" if "prefetch" in plan.chosen else "--prefetch"
    split = f", device {format_bytes(p.device_budget)} + host {format_bytes(p.host_budget)} (planner's split of " \
        "--memory)" if "split" in plan.chosen else ""
    return (f"plan{mezo}: {_seconds(p.step_s)}/step, {p.tokens_per_s:,.0f} tokens/s, peak RSS "
            f"{format_bytes(p.peak_rss)}, {p.bottleneck}-bound, prefetch {plan.prefetch} ({whose}){split} "
            "(details: finetune plan)")
