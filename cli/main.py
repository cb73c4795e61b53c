"""`finetune`: the command-line face of the engine. Commands stay thin: parse, build a dataclass, call the library.

Commands: `run` (cli/train.py), `plan` (cli/plan.py; also `run --dry-run`), `export` (cli/export.py), `info`,
`generate` and `chat` (cli/generate.py).
`run`'s options are the fields of RunConfig (cli/config.py), which holds their types, defaults, help and panels.
Exit codes: 0 success, 1 an expected failure (one `Error:` line on stderr), 2 a usage error (one `Error:` line
too, from `run_script`), 130 a run stopped by Ctrl-C after saving its checkpoint, or stopped while starting.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..offload import format_bytes, parse_size
from .config import ConfigError, Dtype, Panel, RunConfig, field_help, field_types, flag
from .config_file import load_config_file
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, FinetuneError, exit_on_failure, one_line
from .generation_options import Decoding, GenerateOptions
from .startup import importing

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Fine-tune Hugging Face models far larger than your GPU or RAM.",
)

RUN_EPILOG = """[bold]Examples[/bold]

  finetune run ./Llama-3.2-1B ./chat.jsonl --steps 1000 --lr 2e-5 --memory 8GB --nvme /mnt/nvme/swap

  finetune run ./model ./data --config run.yaml --val-fraction 0.05 --eval-every 50 --pack

  finetune run ./Qwen2.5-7B ./chat.jsonl --qlora --lora-rank 16 --lr 2e-4 --memory 6GB     [dim]# adapters only[/dim]

  finetune run --resume --output finetune-out     [dim]# continue a stopped run exactly[/dim]

  finetune run ./model ./data --memory 8GB --nvme /mnt/nvme/swap --dry-run     [dim]# the plan only[/dim]
"""

HARDWARE_HELP = ("Plan for this machine: a profile (fuyou-rtx4090, slideformer-rtx4090, h200-128gb, laptop-24gb-cpu) "
                 "or a JSON file of its fields. Default: this machine, its rates measured once and cached.")


@app.callback()
def main() -> None:
    """Fine-tune Hugging Face models far larger than your GPU or RAM."""


def run_script(args: list[str] | None = None) -> int:
    """The `finetune` console script (cli/entry.py): `app` on `args` (default: sys.argv), returning the exit code.

    Usage errors (exit 2) are printed as one `Error:` line, as expected failures are, instead of typer's usage
    line and boxed panel, so that a script reads every failure the same way: the last line of stderr.
    """
    try:
        code = app(args=args, prog_name="finetune", standalone_mode=False)
    except typer.TyperException as error:  # typer's click: usage errors (exit 2), and its own such as FileError (1)
        if type(error).__name__ == "NoArgsIsHelpError":  # bare `finetune`: the help is printed (typer's own test)
            return error.exit_code
        hint = f" (see '{error.ctx.command_path} --help')" if getattr(error, "ctx", None) is not None else ""
        typer.echo(f"Error: {one_line(error.format_message()).removesuffix('.')}{hint}", err=True)
        return error.exit_code
    except typer.Abort:  # end of input at a prompt (typer turns Ctrl-C into exit 130 itself)
        typer.echo("Error: aborted", err=True)
        return EXIT_FAILURE
    return code if isinstance(code, int) else 0  # standalone_mode=False returns typer.Exit's code


Command = Callable[..., None]


def _options_of(*classes: type) -> Callable[[Command], Command]:
    """A decorator: `command` with one typer parameter per field of the dataclasses `classes` in place of its
    `**fields`, so that each option's type, default, help and panel are read from the dataclass rather than
    written out a second time here.

    Each of those parameters defaults to None, meaning "not typed", so a flag overrides the --config file only
    when given, and the file or else the field's default applies otherwise.
    """
    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        fields = [_field_parameter(cls, field) for cls in classes for field in dataclasses.fields(cls)]
        # typer builds its options from inspect.signature(command), which returns __signature__ when it is set.
        command.__signature__ = signature.replace(parameters=[*own, *fields])  # type: ignore[attr-defined]
        return command

    return decorate


@functools.cache
def _help(cls: type) -> dict[str, str]:
    return field_help(cls)


def _field_parameter(cls: type, field: dataclasses.Field[Any]) -> inspect.Parameter:
    """`name: Annotated[Optional[T], typer.Option(...)] = None` for one field (RunConfig's option() metadata:
    its panel, flags, or a positional argument)."""
    kind, _ = field_types(cls)[field.name]
    if field.metadata.get("argument"):
        info = typer.Argument(help=_help(cls)[field.name], show_default=False)
    else:
        info = typer.Option(*field.metadata.get("flags") or [flag(field.name)], help=_help(cls)[field.name],
                            rich_help_panel=field.metadata.get("panel"), show_default=_shown_default(field.default))
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def _shown_default(default: Any) -> str | bool:
    """The field's default as --help shows it (the option's own default is None). None and flags show none: a
    flag not given is off. Floats are shown as typed: 2e-5, not Python's 2e-05."""
    if default is None or isinstance(default, bool):
        return False
    if isinstance(default, enum.Enum):
        return str(default.value)
    return re.sub(r"e([+-])0+(?=\d)", r"e\1", str(default))


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", exists=True, dir_okay=False,
    help="YAML or TOML file with run's options by their names (seq_len: 1024), or Hugging Face Trainer's "
    "(learning_rate: 2e-5); flags override it.")]
"""`--config` of `run` and `plan`."""


@app.command(epilog=RUN_EPILOG)
@_options_of(RunConfig)
def run(
    config_file: ConfigFile = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --output from its latest checkpoint, with its saved options.",
        rich_help_panel=Panel.CHECKPOINTS)] = False,
    resume_from: Annotated[Optional[str], typer.Option(
        "--resume-from", help="Continue from this checkpoint of --output (a name such as step-00000400) instead of "
        "the latest, e.g. when the latest is damaged; the later ones are dropped once it loads.",
        rich_help_panel=Panel.CHECKPOINTS, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="No progress bar; print the summary as JSON.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the inputs and print the plan (finetune plan's table), then exit; writes nothing.")
    ] = False,
    hardware: Annotated[Optional[str], typer.Option(
        "--hardware", help="With --dry-run: " + HARDWARE_HELP, show_default=False)] = None,
    **fields: Any,
) -> None:
    """Fine-tune MODEL on DATASET, streaming its training state through memory and NVMe."""
    with importing():
        from .plan import make_plan, summary_line
        from .train import configure, prepare, train

    if hardware is not None and not dry_run:
        raise typer.BadParameter("--hardware plans for another machine; add --dry-run", param_hint="--hardware")

    given = {name: value for name, value in fields.items() if value is not None}  # None: not typed
    with exit_on_failure():
        try:
            values = {**(load_config_file(config_file) if config_file else {}), **given}
            resume = resume or resume_from is not None
            config = configure(values, resume=resume, checkpoint=resume_from)
            profile = _profile(hardware)
        except ConfigError as error:
            raise typer.BadParameter(str(error)) from None  # a usage error: exit code 2
        prepared = prepare(config, resume=resume, checkpoint=resume_from)
        try:
            plan = make_plan(config, prepared.model, prepared.model_dir, profile, progress=Console(stderr=True))
        except OSError as error:  # measuring the rates writes a probe file; a full disk must not stop the run
            if dry_run:
                raise FinetuneError(f"cannot measure this machine's rates ({error.strerror}); pass --hardware, or "
                                    "free space at --nvme") from None
            plan = None
        if dry_run:
            _print_plan(plan, as_json)
            return
        if plan is not None:
            prepared.budget, prepared.prefetch = plan.budget, plan.prefetch  # the planner's knobs, or the flags'
            Console(stderr=True).print(summary_line(plan), highlight=False, soft_wrap=True)
        try:
            summary = train(prepared, console=Console(), quiet=as_json)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
            typer.echo(f"Stopped by Ctrl-C; the last complete checkpoint (if any) is kept. Resume with: finetune run "
                       f"--resume --output {config.output}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        typer.echo(json.dumps(summary))
    if summary["status"] == "interrupted":
        typer.echo(f"Interrupted at step {summary['step']}; checkpoint saved. Resume with: {summary['resume']}",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED)


PLAN_EPILOG = """[bold]Examples[/bold]

  finetune plan ./Llama-2-13b --memory 8GB --nvme /mnt/nvme/swap --batch-size 4 --seq-len 1024

  finetune plan ./config-only-dir --hardware fuyou-rtx4090 --json     [dim]# a config.json is enough[/dim]

  finetune plan ./model --qlora --hardware my-box.json --steps 1000
"""


@app.command(epilog=PLAN_EPILOG)
@_options_of(RunConfig)
def plan(
    config_file: ConfigFile = None,
    hardware: Annotated[Optional[str], typer.Option("--hardware", help=HARDWARE_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (bytes and seconds).")] = False,
    **fields: Any,
) -> None:
    """Predict what `finetune run` with these options will cost: memory per tier, disk, I/O and time per step,
    the bottleneck; exits 1 when the run cannot fit. MODEL may hold only config.json; DATASET is not read."""
    with importing():
        from .plan import NO_DATASET, make_plan, plan_model

    given = {name: value for name, value in fields.items() if value is not None}
    with exit_on_failure():
        try:
            values = {**(load_config_file(config_file) if config_file else {}), **given}
            values.setdefault("dataset", NO_DATASET)
            config = RunConfig(**values)
            profile = _profile(hardware)
        except ConfigError as error:
            raise typer.BadParameter(str(error)) from None
        model, model_dir = plan_model(config)
        _print_plan(make_plan(config, model, model_dir, profile, progress=Console(stderr=True)), as_json)


def _profile(hardware: str | None) -> Any:
    """The --hardware machine, or None for this one (ConfigError: a usage error)."""
    from .plan import load_profile

    return load_profile(hardware) if hardware is not None else None


def _print_plan(plan: Any, as_json: bool) -> None:
    """The plan as a table (or JSON) on stdout; then a `FinetuneError` (exit 1) if it cannot run."""
    from .plan import plan_dict, plan_table

    data = plan_dict(plan)
    if as_json:
        typer.echo(json.dumps(data))
    else:
        Console().print(plan_table(data))
    if data["problems"]:
        raise FinetuneError("; ".join(data["problems"]))


EXPORT_EPILOG = """[bold]Examples[/bold]

  finetune export finetune-out ./my-model --dtype bfloat16

  finetune export lora-run ./my-adapter     [dim]# a --lora run: the peft adapter directory[/dim]

  finetune export lora-run ./merged --merge --dtype bfloat16     [dim]# base + adapter as one model[/dim]
"""


@app.command(epilog=EXPORT_EPILOG)
def export(
    checkpoint: Annotated[Path, typer.Argument(
        exists=True, file_okay=False,
        help="A run directory (its latest checkpoint is used) or a checkpoint directory.")],
    out: Annotated[Path, typer.Argument(
        help="New directory for the Hugging Face model (save_pretrained layout), or for a LoRA run the peft adapter.")],
    dtype: Annotated[Dtype, typer.Option(
        help="dtype of the exported weights (auto: float32, the master weights; with --merge, the base model's).",
    )] = Dtype.AUTO,
    merge: Annotated[bool, typer.Option(
        "--merge",
        help="For a LoRA run: write the base model with the adapter merged in, a model that loads without peft.",
    )] = False,
    base: Annotated[Optional[Path], typer.Option(
        help="Base model directory for --merge (default: the run's MODEL, from its run-config.yaml).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a checkpoint as a Hugging Face model directory that from_pretrained loads (or, for a LoRA run, a peft
    adapter directory), with its tokenizer."""
    with importing():
        import torch

        from .export import export_checkpoint, is_adapter

    if base is not None and not merge:
        raise typer.BadParameter("--base is the base model for --merge; add --merge, or drop --base",
                                 param_hint="--base")
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
    path: Annotated[list[Path], typer.Option(
        "--path", help="Report free disk space here (repeatable).")] = (Path("."),),  # a tuple: nothing can mutate it
    bandwidth: Annotated[bool, typer.Option(
        "--bandwidth", help="Also measure write and read speed at each --path (writes a temporary file).")] = False,
    bandwidth_size: Annotated[str, typer.Option(help="Size of the --bandwidth test file.")] = "1GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
) -> None:
    """Show the hardware the engine sees: cores, RAM, GPU memory, free disk (and disk speed on request)."""
    with importing():
        import torch

        from ..offload import detect_hardware
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
                rates = disk_bandwidth(p, nbytes, lambda message: typer.echo(message, err=True))
                rows[f"disk write at {p}"] = f"{format_bytes(rates.write)}/s"
                rows[f"disk read at {p}"] = f"{format_bytes(rates.read)}/s"
                rows[f"disk time compute hides at {p}"] = f"{rates.overlap:.0%}"
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title="finetune info", show_header=False)
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)


GENERATE_EPILOG = """[bold]Examples[/bold]

  finetune generate finetune-out --prompt "Once upon a time" --max-new-tokens 64     [dim]# a run's final model[/dim]

  finetune generate ./Llama-2-13b --prompt "Why is the sky blue?" --chat-template --memory 8GB --temperature 0.7

  finetune generate lora-run --prompt "2 + 2 =" --json     [dim]# a LoRA run: the adapter on its streamed base[/dim]
"""

MODEL_OR_RUN = Annotated[str, typer.Argument(
    help="A model directory or hub id, a run directory (its final model, else its latest portable checkpoint), a "
         "checkpoint, or a peft adapter directory.", show_default=False)]


@app.command(epilog=GENERATE_EPILOG)
@_options_of(Decoding, GenerateOptions)
def generate(
    model_or_run: MODEL_OR_RUN,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="The text to continue ('-': read it from stdin).", show_default=False)] = None,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template", help="Send the prompt as a user turn through the tokenizer's chat template (for chat "
        "models) instead of continuing it as text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON (no streaming).")] = False,
    **fields: Any,
) -> None:
    """Generate text from a model or a run's result, streaming its weights through the engine within the budget
    (a model larger than RAM works); the text is printed as it comes."""
    if prompt is None:
        raise typer.BadParameter("give the text to continue", param_hint="--prompt")
    text = sys.stdin.read() if prompt == "-" else prompt
    decoding, options = _generation_settings(fields)
    with importing():
        from .generate import generate as generate_text
    with exit_on_failure():
        result = generate_text(model_or_run, text, decoding, options, chat_template=chat_template,
                               out=None if as_json else sys.stdout)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{result['new_tokens']} tokens at {result['tokens_per_s']:.1f} tokens/s · peak memory "
                   f"{format_bytes(result['peak_rss'])}", err=True)


CHAT_EPILOG = """[bold]Examples[/bold]

  finetune chat finetune-out --memory 8GB     [dim]# type a message, Enter; /reset forgets, /exit ends[/dim]

  printf 'Hi\\nWhat is 2 + 2?\\n' | finetune chat ./model --max-new-tokens 32     [dim]# turns from a pipe[/dim]
"""


@app.command(epilog=CHAT_EPILOG)
@_options_of(Decoding, GenerateOptions)
def chat(model_or_run: MODEL_OR_RUN, **fields: Any) -> None:
    """Talk to a model or a run's result through its chat template, one line a turn (/reset forgets the
    conversation, /exit or Ctrl-D ends it), its weights streamed through the engine within the budget."""
    decoding, options = _generation_settings(fields)
    with importing():
        from .generate import chat as chat_with
    with exit_on_failure():
        chat_with(model_or_run, decoding, options, lines=sys.stdin, out=sys.stdout,
                  prompt_to=sys.stderr if sys.stdin.isatty() else None)


def _generation_settings(fields: dict[str, Any]) -> tuple[Decoding, GenerateOptions]:
    """`generate`'s and `chat`'s options as the two dataclasses (a bad value: a usage error, exit 2)."""
    given = {name: value for name, value in fields.items() if value is not None}
    names = {field.name for field in dataclasses.fields(Decoding)}
    try:
        return (Decoding(**{k: v for k, v in given.items() if k in names}),
                GenerateOptions(**{k: v for k, v in given.items() if k not in names}))
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
