"""`finetune`: the command-line face of the engine. Commands stay thin: parse, build a dataclass, call the library.

Commands: `run` (cli/train.py), `export` (cli/export.py), `info`. The planner's `plan` command goes beside them.
Exit codes: 0 success, 1 an expected failure (one `Error:` line on stderr), 2 a usage error, 130 a run stopped
by Ctrl-C after saving its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..offload import ClipMode, detect_hardware, format_bytes, parse_size
from .config import ConfigError, Dtype, OptimizerName, RunConfig, field_help, load_config_file
from .data import Format
from .errors import EXIT_INTERRUPTED, exit_on_failure
from .schedule import Schedule

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Fine-tune Hugging Face models far larger than your GPU or RAM.",
)

HELP = field_help(RunConfig)
MODEL, DATA, TRAINING, LORA, MEMORY, CHECKPOINTS = "Model", "Data", "Training", "LoRA", "Memory", "Checkpoints"

RUN_EPILOG = """[bold]Examples[/bold]

  finetune run ./Llama-3.2-1B ./chat.jsonl --steps 1000 --lr 2e-5 --memory 8GB --nvme /mnt/nvme/swap

  finetune run ./model ./data --config run.yaml --val-fraction 0.05 --eval-every 50 --pack

  finetune run ./Qwen2.5-7B ./chat.jsonl --qlora --lora-rank 16 --lr 2e-4 --memory 6GB     [dim]# adapters only[/dim]

  finetune run --resume --output finetune-out     [dim]# continue a stopped run exactly[/dim]
"""


@app.callback()
def main() -> None:
    """Fine-tune Hugging Face models far larger than your GPU or RAM."""


@app.command(epilog=RUN_EPILOG)
def run(
    model: Annotated[Optional[str], typer.Argument(help=HELP["model"], show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Argument(help=HELP["dataset"], show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="YAML or TOML file with these options by their names (seq_len: 1024); flags override it.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its latest checkpoint, with its saved options.", rich_help_panel=CHECKPOINTS)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="No progress bar; print the summary as JSON.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help=HELP["output"], show_default="finetune-out")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help=HELP["tokenizer"], rich_help_panel=MODEL)] = None,
    dtype: Annotated[Optional[Dtype], typer.Option(help=HELP["dtype"], rich_help_panel=MODEL, show_default="auto")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code", help=HELP["trust_remote_code"], rich_help_panel=MODEL)] = None,
    format: Annotated[Optional[Format], typer.Option("--format", help=HELP["format"], rich_help_panel=DATA, show_default="auto")] = None,
    train_on_prompt: Annotated[Optional[bool], typer.Option("--train-on-prompt", help=HELP["train_on_prompt"], rich_help_panel=DATA)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help=HELP["seq_len"], rich_help_panel=DATA, show_default="512")] = None,
    pack: Annotated[Optional[bool], typer.Option("--pack/--no-pack", help=HELP["pack"], rich_help_panel=DATA, show_default=False)] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help=HELP["val_fraction"], rich_help_panel=DATA, show_default="0")] = None,
    val_file: Annotated[Optional[str], typer.Option(help=HELP["val_file"], rich_help_panel=DATA)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=HELP["eval_every"], rich_help_panel=DATA, show_default="100")] = None,
    steps: Annotated[Optional[int], typer.Option(help=HELP["steps"], rich_help_panel=TRAINING)] = None,
    epochs: Annotated[Optional[float], typer.Option(help=HELP["epochs"], rich_help_panel=TRAINING)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=HELP["batch_size"], rich_help_panel=TRAINING, show_default="1")] = None,
    accumulation_steps: Annotated[Optional[int], typer.Option(help=HELP["accumulation_steps"], rich_help_panel=TRAINING, show_default="1")] = None,
    lr: Annotated[Optional[float], typer.Option(help=HELP["lr"], rich_help_panel=TRAINING, show_default="2e-5")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help=HELP["schedule"], rich_help_panel=TRAINING, show_default="cosine")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help=HELP["warmup_steps"], rich_help_panel=TRAINING, show_default="0")] = None,
    min_lr: Annotated[Optional[float], typer.Option(help=HELP["min_lr"], rich_help_panel=TRAINING, show_default="0")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=HELP["weight_decay"], rich_help_panel=TRAINING, show_default="0")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help=HELP["max_grad_norm"], rich_help_panel=TRAINING, show_default="1.0")] = None,
    clip_mode: Annotated[Optional[ClipMode], typer.Option(help=HELP["clip_mode"], rich_help_panel=TRAINING, show_default="exact")] = None,
    seed: Annotated[Optional[int], typer.Option(help=HELP["seed"], rich_help_panel=TRAINING, show_default="0")] = None,
    optimizer: Annotated[Optional[OptimizerName], typer.Option(help=HELP["optimizer"], rich_help_panel=TRAINING, show_default="adamw")] = None,
    lora: Annotated[Optional[bool], typer.Option("--lora", help=HELP["lora"], rich_help_panel=LORA)] = None,
    qlora: Annotated[Optional[bool], typer.Option("--qlora", help=HELP["qlora"], rich_help_panel=LORA)] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help=HELP["lora_rank"], rich_help_panel=LORA, show_default="16")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help=HELP["lora_alpha"], rich_help_panel=LORA, show_default=False)] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help=HELP["lora_dropout"], rich_help_panel=LORA, show_default="0.05")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help=HELP["lora_targets"], rich_help_panel=LORA, show_default="all-linear")] = None,
    memory: Annotated[Optional[str], typer.Option(help=HELP["memory"], rich_help_panel=MEMORY)] = None,
    device_memory: Annotated[Optional[str], typer.Option(help=HELP["device_memory"], rich_help_panel=MEMORY)] = None,
    host_memory: Annotated[Optional[str], typer.Option(help=HELP["host_memory"], rich_help_panel=MEMORY)] = None,
    nvme: Annotated[Optional[str], typer.Option(help=HELP["nvme"], rich_help_panel=MEMORY)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help=HELP["checkpoint_every"], rich_help_panel=CHECKPOINTS, show_default="100")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help=HELP["keep_checkpoints"], rich_help_panel=CHECKPOINTS, show_default="2")] = None,
) -> None:
    """Fine-tune MODEL on DATASET, streaming its training state through memory and NVMe."""
    from .train import configure, prepare, train

    # The config fields given on the command line: every option defaults to None, meaning "not given".
    given = {name: value for name, value in locals().items() if name in HELP and value is not None}
    with exit_on_failure():
        try:
            values = {**(load_config_file(config_file) if config_file else {}), **given}
            config = configure(values, resume=resume)
        except ConfigError as error:
            raise typer.BadParameter(str(error)) from None  # a usage error: exit code 2
        try:
            summary = train(prepare(config, resume=resume), console=Console(), quiet=as_json)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
            typer.echo(f"Stopped by Ctrl-C; the last complete checkpoint (if any) is kept. Resume with: finetune run "
                       f"--resume --output {config.output}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        typer.echo(json.dumps(summary))
    if summary["status"] == "interrupted":
        typer.echo(f"Interrupted at step {summary['step']}; checkpoint saved. Resume with: {summary['resume']}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)


EXPORT_EPILOG = """[bold]Examples[/bold]

  finetune export finetune-out ./my-model --dtype bfloat16

  finetune export lora-run ./my-adapter     [dim]# a --lora run: the peft adapter directory[/dim]

  finetune export lora-run ./merged --merge --dtype bfloat16     [dim]# base + adapter as one model[/dim]
"""


@app.command(epilog=EXPORT_EPILOG)
def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A run directory (its latest checkpoint is used) or a checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="New directory for the Hugging Face model (save_pretrained layout), or for a LoRA run the peft adapter.")],
    dtype: Annotated[Dtype, typer.Option(help="dtype of the exported weights (auto: float32, the master weights; with --merge, the base model's).")] = Dtype.AUTO,
    merge: Annotated[bool, typer.Option("--merge", help="For a LoRA run: write the base model with the adapter merged in, a model that loads without peft.")] = False,
    base: Annotated[Optional[Path], typer.Option(help="Base model directory for --merge (default: the run's MODEL, from its run-config.yaml).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a checkpoint as a Hugging Face model directory that from_pretrained loads (or, for a LoRA run, a peft
    adapter directory), with its tokenizer."""
    from .export import export_checkpoint, is_adapter

    if base is not None and not merge:
        raise typer.BadParameter("--base is the base model for --merge; add --merge, or drop --base", param_hint="--base")
    torch_dtype = None if dtype is Dtype.AUTO else getattr(torch, dtype.value)
    with exit_on_failure():
        written = export_checkpoint(checkpoint, out, torch_dtype, merge=merge, base=base)
    adapter = is_adapter(written)
    if as_json:
        kind = "adapter" if adapter else "merged" if merge else "model"
        written_dtype = json.loads((written / "config.json").read_text())["dtype"] if merge else \
            str(torch_dtype or torch.float32).removeprefix("torch.")
        typer.echo(json.dumps({"export": str(written), "kind": kind, "dtype": written_dtype}))
    elif adapter:
        Console().print(f"exported the LoRA adapter to {written}; load it with PeftModel.from_pretrained(base, "
                        f"{str(written)!r}), or pass --merge for a merged model")
    else:
        Console().print(f"exported to {written}; load it with AutoModelForCausalLM.from_pretrained({str(written)!r})")


@app.command(epilog="Example: finetune info --path /mnt/nvme --bandwidth --json")
def info(
    path: Annotated[list[Path], typer.Option("--path", help="Report free disk space here (repeatable).")] = [Path(".")],
    bandwidth: Annotated[bool, typer.Option("--bandwidth", help="Also measure write and read speed at each --path (writes a temporary file).")] = False,
    bandwidth_size: Annotated[str, typer.Option(help="Size of the --bandwidth test file.")] = "256MB",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
) -> None:
    """Show the hardware the engine sees: cores, RAM, GPU memory, free disk (and disk speed on request)."""
    from .hardware import disk_bandwidth

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hardware = detect_hardware(device)
    rows = {
        "cpu cores": str(hardware.cpu_cores),
        "ram total": format_bytes(hardware.ram_total),
        "ram available": format_bytes(hardware.ram_available),
        "compute device": hardware.device_name,
        "device memory free": format_bytes(hardware.device_free),
        **{f"disk free at {p}": format_bytes(hardware.disk_free(p)) for p in path},
    }
    if bandwidth:
        try:
            nbytes = parse_size(bandwidth_size)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--bandwidth-size") from None
        with exit_on_failure():
            for p in path:
                write, read = disk_bandwidth(p, nbytes)
                rows[f"disk write at {p}"] = f"{format_bytes(write)}/s"
                rows[f"disk read at {p}"] = f"{format_bytes(read)}/s"
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title="finetune info", show_header=False)
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)
