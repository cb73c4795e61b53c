"""`finetune`: the command-line face of the engine. Commands stay thin: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from offload import detect_hardware, format_bytes

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Fine-tune Hugging Face models far larger than your GPU or RAM.",
)


@app.callback()
def main() -> None:
    """Fine-tune Hugging Face models far larger than your GPU or RAM."""


@app.command(epilog="Example: finetune info --path /mnt/nvme --json")
def info(
    path: Annotated[list[Path], typer.Option("--path", help="Report free disk space here (repeatable).")] = [Path(".")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
) -> None:
    """Show the hardware the engine sees: cores, RAM, GPU memory, free disk."""
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
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title="finetune info", show_header=False)
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)
