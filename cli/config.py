"""The run configuration: one dataclass, filled from its defaults, then a YAML or TOML file (read by
cli/config_file.py), then the flags.

Field names are the names used everywhere: `seq_len` in a config file is `--seq-len` on the command line. A field
is the one place that describes an option: its type and default, its docstring (the `--help` text, `field_help`),
and its `option(...)` metadata (its `--help` panel and flags); cli/main.py builds `finetune run`'s options from
these. The effective configuration is saved with the run (`run-config.yaml`) and with each checkpoint.
`--resume` starts from that saved copy.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..offload import ActivationMode, ClipMode, parse_size
from .formats import Format, Template, parse_columns
from .optimizer_args import format_optimizer_args, optimizer_kwargs, parse_optimizer_args
from .schedule import Schedule
from .sources import TextUnit
from .tracking import TARGETS, parse_targets

__all__ = ["ConfigError", "Dtype", "OptimizerName", "Panel", "RESUMABLE_CHANGES", "RunConfig", "StorageDtype",
           "field_help", "field_types", "flag"]


class ConfigError(ValueError):
    """Invalid options. This is a usage error (exit code 2), and the message lists every problem at once."""


class Dtype(str, enum.Enum):
    """Compute dtype of the weights. Master weights and optimizer math are always float32."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class StorageDtype(str, enum.Enum):
    """How MeZO stores the trained weights (compute and the update math are float32 either way)."""

    FP32 = "fp32"
    BF16 = "bf16"


class OptimizerName(str, enum.Enum):
    """Optimizers the engine can stream (the classes of the same names in `optim`, with their defaults)."""

    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    GALORE = "galore"
    FRUGAL = "frugal"
    MEZO = "mezo"


class Panel:
    """The panels of `finetune run --help`; an option with none is listed under Options."""

    MODEL, DATA, TRAINING, LORA, MEMORY, CHECKPOINTS = "Model", "Data", "Training", "LoRA", "Memory", "Checkpoints"
    TRACKING = "Tracking"


def option(default: Any, panel: str | None = None, *, flags: tuple[str, ...] = (), argument: bool = False) -> Any:
    """A field with its default, and with what `finetune run` needs beyond the type and docstring: its --help
    `panel`, its `flags` where they are more than --field-name (a short form; a --no- form, so a flag can undo
    a config file's `true`), or `argument` for a value given by position (MODEL, DATASET)."""
    return dataclasses.field(default=default, metadata={"panel": panel, "flags": flags, "argument": argument})


@dataclass
class RunConfig:
    """Everything that defines a fine-tuning run."""

    model: str | None = option(None, argument=True)
    """Local Hugging Face model directory (config.json + safetensors), or a hub id such as org/name."""

    dataset: str | None = option(None, argument=True)
    """A .jsonl/.json/.csv/.parquet/.txt/.md file, a directory of them (or a hub dataset's download, with its
    dataset card), or a `datasets` hub name."""

    output: str = option("finetune-out", flags=("--output", "-o"))
    """Run directory: checkpoints, metrics.jsonl, loss.png and the effective run-config.yaml."""

    tokenizer: str | None = option(None, Panel.MODEL)
    """Tokenizer directory or hub id, when the model directory has none."""

    dtype: Dtype = option(Dtype.AUTO, Panel.MODEL)
    """Compute dtype: auto is bfloat16 on CUDA and float32 on CPU."""

    trust_remote_code: bool = option(False, Panel.MODEL)
    """Run the model's own Python code from its directory or hub repo. Only for models you trust."""

    format: Format = option(Format.AUTO, Panel.DATA)
    """Dataset format. auto detects it from the fields: text, prompt/completion, instruction/input/output, or
    messages (chat: role/content, or ShareGPT's conversations with from/value)."""

    columns: str | None = option(None, Panel.DATA)
    """Your field names for the format's, as NAME=COLUMN pairs, e.g. prompt=question,completion=answer (NAME: text,
    prompt, completion, instruction, input, output, messages). In --config also a mapping."""

    template: Template = option(Template.AUTO, Panel.DATA)
    """How instruction rows become text: chat (the tokenizer's chat template; user turn: instruction, a blank line,
    input; assistant turn: output), alpaca (### Instruction: / ### Input: / ### Response:), or auto: chat when the
    tokenizer has a chat template, else alpaca."""

    text_unit: TextUnit = option(TextUnit.DOCUMENT, Panel.DATA)
    """One example of a .txt/.md file or a text field: document (all of it, newlines kept, one BOS/EOS around it),
    line, or paragraph (split at blank lines)."""

    dataset_config: str | None = option(None, Panel.DATA)
    """The subset of a hub dataset, or of a dataset directory whose README.md card lists configs, e.g.
    wikitext-2-raw-v1."""

    split: str = option("train", Panel.DATA)
    """The split to train on: of a hub dataset, of a directory with a dataset card, or of a directory whose file
    names say their split (train.jsonl, test.jsonl)."""

    train_on_prompt: bool = option(False, Panel.DATA)
    """Compute the loss on prompt tokens too. By default only completion tokens count."""

    seq_len: int = option(512, Panel.DATA)
    """Tokens per sequence. Longer examples are truncated (a text continues in the next sequences), or split across
    sequences with --pack."""

    pack: bool = option(False, Panel.DATA, flags=("--pack/--no-pack",))
    """Concatenate examples and cut them into full sequences of --seq-len tokens (no padding)."""

    val_fraction: float = option(0.0, Panel.DATA)
    """Fraction of the examples held out for the eval loss (e.g. 0.05)."""

    val_file: str | None = option(None, Panel.DATA)
    """A separate validation dataset (a file, a directory or a hub name), instead of --val-fraction; its format is
    detected from its own fields."""

    val_split: str | None = option(None, Panel.DATA)
    """A split of DATASET for the eval loss (e.g. validation or test), instead of --val-fraction or --val-file."""

    eval_every: int = option(100, Panel.DATA)
    """Compute the eval loss every N steps and at the end (0: only at the end)."""

    report_to: str | None = option(None, Panel.TRACKING)
    """Also send the metrics to tensorboard, wandb, mlflow and/or csv (comma-separated), each written offline under
    OUTPUT; their libraries are finetune's optional `track` extra. metrics.jsonl is always written."""

    log_every: int = option(10, Panel.TRACKING)
    """Without a terminal (nohup, CI logs), print a plain progress line every N steps (0: none)."""

    sample_every: int = option(0, Panel.TRACKING)
    """Every N steps, write greedy completions of two held-out prompts (the first validation rows') to
    metrics.jsonl and the terminal (0: none)."""

    steps: int | None = option(None, Panel.TRAINING)
    """Optimizer steps to run. Give this or --epochs (default: 1 epoch)."""

    epochs: float | None = option(None, Panel.TRAINING)
    """Passes over the training set (may be fractional). Give this or --steps."""

    early_stop_patience: int | None = option(None, Panel.TRAINING)
    """Stop when the eval loss has not improved for N evals in a row (needs a validation set); OUTPUT/final/ is
    written as at the end."""

    batch_size: int = option(1, Panel.TRAINING)
    """Sequences per micro-batch."""

    accumulation_steps: int = option(1, Panel.TRAINING)
    """Micro-batches per optimizer step. One step sees batch_size * accumulation_steps sequences."""

    lr: float = option(2e-5, Panel.TRAINING)
    """Peak learning rate."""

    schedule: Schedule = option(Schedule.COSINE, Panel.TRAINING)
    """Decay after warmup: cosine, linear (both to --min-lr at the last step), or constant."""

    warmup_steps: int = option(0, Panel.TRAINING)
    """Steps of linear warmup up to --lr."""

    min_lr: float = option(0.0, Panel.TRAINING)
    """Learning rate at the last step of a cosine or linear schedule."""

    decay_steps: int | None = option(None, Panel.TRAINING)
    """The step at which a cosine or linear decay reaches --min-lr, and stays there. Default: the run's --steps
    (or the steps its --epochs make) when it starts, saved in run-config.yaml, so a run extended with --resume
    --steps keeps its schedule."""

    weight_decay: float = option(0.0, Panel.TRAINING)
    """Decoupled weight decay (AdamW)."""

    max_grad_norm: float = option(1.0, Panel.TRAINING)
    """Clip the gradient to this global norm (0: no clipping)."""

    clip_mode: ClipMode = option(ClipMode.EXACT, Panel.TRAINING)
    """exact: the whole-model norm (updates wait for backward). per-block: each block clipped to its share, so
    updates overlap backward."""

    seed: int = option(0, Panel.TRAINING)
    """Seed of the data order, the validation split and the torch RNG."""

    optimizer: OptimizerName = option(OptimizerName.ADAMW, Panel.TRAINING)
    """adamw (fp32, 8 B/param of state), adamw8bit (2 B/param), galore (rank 128 projection), frugal (AdamW on a
    quarter of the columns, signSGD on the rest) or mezo (zeroth-order: forward passes only, no state; needs
    --accumulation-steps 1, ignores --max-grad-norm). See README's Optimizers section."""

    optimizer_args: str | None = option(None, Panel.TRAINING)
    """Settings of --optimizer beyond --lr and --weight-decay, as NAME=VALUE pairs: the keyword arguments of its
    class in finetune.optim, e.g. rank=64,update_proj_gap=200 for galore, density=0.5 for frugal, eps=1e-4 for mezo,
    betas=(0.9,0.95) for any Adam. In --config also a mapping."""

    lora: bool = option(False, Panel.LORA)
    """Train LoRA adapters instead of every weight: the base stays frozen, read straight from the model's files,
    and checkpoints hold only the adapters. LoRA usually wants a higher --lr (1e-4 to 2e-4)."""

    qlora: bool = option(False, Panel.LORA)
    """QLoRA: --lora with the base's frozen linear weights stored as NF4 (4-bit) in every memory tier, about a
    quarter of their bf16 bytes."""

    lora_rank: int = option(16, Panel.LORA)
    """Rank of each adapter (its A is rank x in, its B out x rank)."""

    lora_alpha: float | None = option(None, Panel.LORA)
    """Adapter scale numerator: updates are scaled by alpha / rank. Default: 2 x --lora-rank."""

    lora_dropout: float = option(0.05, Panel.LORA)
    """Dropout on the adapters' input while training."""

    lora_targets: str = option("all-linear", Panel.LORA)
    """Modules to adapt: all-linear (the attention and MLP projections: every linear layer but the output layer),
    or comma-separated names such as q_proj,v_proj."""

    merge_at_end: bool = option(False, Panel.LORA)
    """With --lora: OUTPUT/final/ holds the base model with the adapters merged in (in the base's dtype) instead
    of the adapter."""

    memory: str | None = option(None, Panel.MEMORY)
    """RAM/VRAM for the device and host tiers together, e.g. 8GB. Each tier gets its minimum; on CPU the planner
    splits the rest (its choice is in the plan), on CUDA it is split evenly. Default: taken from the machine."""

    device_memory: str | None = option(None, Panel.MEMORY)
    """Bytes for the device tier (GPU memory on CUDA), e.g. 6GB. Overrides its share of --memory."""

    host_memory: str | None = option(None, Panel.MEMORY)
    """Bytes for the host tier (RAM), e.g. 16GB. Overrides its share of --memory."""

    nvme: str | None = option(None, Panel.MEMORY)
    """Swap directory on a fast disk for the state that does not fit in memory."""

    storage_dtype: StorageDtype = option(StorageDtype.FP32, Panel.MEMORY)
    """With --optimizer mezo: bf16 stores the weights in half the bytes (in memory, in swap, and read and written
    each step); compute stays fp32, and each update is rounded back to bf16 stochastically."""
    activations: ActivationMode = option(ActivationMode.RECOMPUTE, Panel.MEMORY)
    """What each layer keeps for its backward. recompute: only its input (its forward runs again in backward).
    keep: all its activations in RAM until its backward, outside the budget (no recompute). offload: its saved
    tensors written to --nvme as forward makes them and read back ahead of its backward (no recompute, within the
    budget; needs --nvme). auto: offload where this machine's rates say it costs less than recomputing. The same
    math either way."""

    prefetch: int | None = option(None, Panel.MEMORY)
    """Blocks loaded ahead of the one computing (0: none). Default: the planner's fastest, 1-4 (in the plan)."""

    verify_swap: bool = option(False, Panel.MEMORY)
    """Check every read of a swap file against a checksum of what was written to it, and stop with the file named
    when they differ: for a disk you do not trust (the cost: benchmarks/checkpoint_cost.py)."""

    checkpoint_every: int = option(100, Panel.CHECKPOINTS)
    """Save a checkpoint every N steps, and always at the end (0: only at the end)."""

    keep_checkpoints: int = option(2, Panel.CHECKPOINTS)
    """Keep only the newest K checkpoints. A finished run keeps its last one, and the portable ones among the
    others (those in swap are only for resuming). 0: keep the newest while running, none once OUTPUT/final/ is
    written (the run can then not be extended)."""

    keep_best: bool = option(False, Panel.CHECKPOINTS)
    """Also keep the checkpoint with the lowest eval loss (saved portable when an eval improves), whatever
    --keep-checkpoints drops, and write OUTPUT/final/ from it. Needs a validation set."""

    portable_checkpoints: bool = option(False, Panel.CHECKPOINTS)
    """Copy the whole state into every checkpoint, so that it stands alone (it can be exported, copied, moved).
    Default with --nvme: a checkpoint writes only what is still in memory and references the swap files, which
    stay in --nvme while it is kept; a finished run's last checkpoint is always portable."""

    def __post_init__(self) -> None:
        if isinstance(self.columns, dict):  # a config file's mapping, saved as the flag's text
            self.columns = ",".join(f"{name}={column}" for name, column in self.columns.items())
        if isinstance(self.optimizer_args, dict):  # the same, in a canonical text (cli/optimizer_args.py)
            self.optimizer_args = format_optimizer_args({str(k): v for k, v in self.optimizer_args.items()})
        errors = [error for name in _fields() if (error := self._coerce(name))]
        errors = errors or self._check() + self._check_lora()  # the range checks need values of the right type
        if errors:
            raise ConfigError("; ".join(errors))
        self.optimizer_args = format_optimizer_args(parse_optimizer_args(self.optimizer_args))  # as saved, by name
        self.lora = self.lora or self.qlora
        if self.lora and self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank  # saved resolved, so run-config.yaml shows the scale used

    def _coerce(self, name: str) -> str | None:
        """Bring a value read from a file to the field's type; return a problem, or None. A float must be
        finite: no option means anything by nan or inf, and `nan < 0` is False, so a range check would let it
        through to the first step."""
        value, (kind, optional) = getattr(self, name), field_types()[name]
        if value is None and optional:
            return None
        try:
            setattr(self, name, _as_type(value, kind))
        except (TypeError, ValueError):
            expected = ", ".join(m.value for m in kind) if isinstance(kind, enum.EnumMeta) else kind.__name__
            return f"{flag(name)} {value!r}: expected {expected}"
        if kind is float and not math.isfinite(getattr(self, name)):  # typer and YAML both read nan and inf
            return f"{flag(name)} {getattr(self, name)} must be a finite number"
        return None

    def _check(self) -> list[str]:
        errors = []
        if self.model is None:
            errors.append("MODEL is missing: give it as the first argument or set `model:` in --config")
        if self.dataset is None:
            errors.append("DATASET is missing: give it as the second argument or set `dataset:` in --config")
        minimums = {"seq_len": 2, "batch_size": 1, "accumulation_steps": 1, "warmup_steps": 0, "eval_every": 0,
                    "checkpoint_every": 0, "keep_checkpoints": 0, "steps": 1, "decay_steps": 1,
                    "early_stop_patience": 1, "prefetch": 0, "log_every": 0, "sample_every": 0}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, int) and value < minimum:
                errors.append(f"{flag(name)} {value} must be >= {minimum}")
        if self.merge_at_end and not self.lora:
            errors.append("--merge-at-end merges LoRA adapters: add --lora (a full fine-tune's OUTPUT/final/ is the "
                          "model already)")
        for name in ("lr", "min_lr", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                errors.append(f"{flag(name)} {getattr(self, name)} must be >= 0")
        if self.storage_dtype is not StorageDtype.FP32 and self.optimizer is not OptimizerName.MEZO:
            errors.append(f"--storage-dtype {self.storage_dtype.value} needs --optimizer mezo (the other optimizers "
                          "keep fp32 master weights); drop --storage-dtype or use --optimizer mezo")
        if self.optimizer is OptimizerName.MEZO and self.accumulation_steps != 1:
            errors.append(f"--accumulation-steps {self.accumulation_steps} cannot be used with --optimizer mezo (it "
                          "has no gradients to accumulate); use --batch-size for larger steps")
        if self.optimizer is OptimizerName.MEZO and self.dtype in (Dtype.BFLOAT16, Dtype.FLOAT16):
            errors.append(f"--dtype {self.dtype.value} cannot be used with --optimizer mezo (it perturbs and updates "
                          "the weights as they compute, in float32); drop --dtype, or pass --storage-dtype bf16 to "
                          "store the weights in bf16")
        if 0 <= self.lr < self.min_lr:
            errors.append(f"--min-lr {self.min_lr} is above --lr {self.lr}; lower it")
        if self.epochs is not None and self.epochs <= 0:
            errors.append(f"--epochs {self.epochs} must be > 0")
        if not (self.val_fraction or self.val_file or self.val_split):
            errors += [f"{flag(name)} compares eval losses, so it needs a validation set: add --val-fraction, "
                       "--val-file or --val-split" for name in ("keep_best", "early_stop_patience")
                       if getattr(self, name)]
        if self.steps is not None and self.epochs is not None:
            errors.append("--steps and --epochs both given; keep one")
        if self.activations is ActivationMode.OFFLOAD and self.nvme is None:
            errors.append("--activations offload writes the layers' activations to the swap directory: add --nvme "
                          "DIR, or use --activations recompute")
        if not 0.0 <= self.val_fraction < 1.0:
            errors.append(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.val_fraction and self.val_file:
            errors.append("--val-fraction and --val-file both given; keep one")
        if self.val_split is not None and (self.val_fraction or self.val_file):
            errors.append(f"--val-split and {'--val-file' if self.val_file else '--val-fraction'} both given; keep one")
        if self.val_split is not None and self.val_split == self.split:
            errors.append(f"--val-split {self.val_split} is the split trained on (--split); choose another split")
        for name in ("split", "val_split", "dataset_config"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                errors.append(f"{flag(name)} is empty; give a name, or drop it")
        try:
            parse_columns(self.columns)
        except ValueError as error:
            errors.append(f"--columns {self.columns!r}: {error}; give NAME=COLUMN pairs such as "
                          "prompt=question,completion=answer")
        if self.optimizer_args is not None:  # checked by the optimizer's constructor: this imports torch
            try:
                optimizer_kwargs(self.optimizer.value, self.optimizer_args)
            except ValueError as error:
                errors.append(str(error))
        try:
            parse_targets(self.report_to)
        except ValueError as error:
            errors.append(f"--report-to {self.report_to!r}: {error}; choose from {', '.join(TARGETS)} "
                          "(comma-separated), or none")
        for name in ("memory", "device_memory", "host_memory"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_size(value)
                except ValueError:
                    errors.append(f"{flag(name)} {value!r} is not a size; use e.g. 512MB or 8GB")
        if None not in (self.memory, self.device_memory, self.host_memory):
            errors.append("--memory, --device-memory and --host-memory all given; drop --memory")
        return errors

    def _check_lora(self) -> list[str]:
        lora = self.lora or self.qlora
        errors = []
        if self.lora_rank < 1:
            errors.append(f"--lora-rank {self.lora_rank} must be >= 1")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            errors.append(f"--lora-alpha {self.lora_alpha} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        if not self.lora_targets.strip(" ,"):
            errors.append("--lora-targets is empty; give module names such as q_proj,v_proj, or all-linear")
        if not lora:  # settings that would be silently ignored
            defaults = {field.name: field.default for field in dataclasses.fields(RunConfig)}
            errors += [f"{flag(name)} {getattr(self, name)!r} has no effect without --lora; add --lora (or --qlora)"
                       for name in _LORA_SETTINGS if getattr(self, name) != defaults[name]]
        if lora and self.optimizer is OptimizerName.MEZO:
            errors.append("--optimizer mezo cannot train LoRA adapters (the engine's MeZO perturbs every weight, and "
                          "the base is frozen); drop --lora/--qlora or choose another --optimizer")
        return errors

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums as their strings), as saved in run-config.yaml."""
        return {name: _plain(getattr(self, name)) for name in _fields()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def differences(self, other: RunConfig, *, ignore: frozenset[str] = frozenset()) -> list[str]:
        """'--flag value (checkpoint: other value)' for each field that differs from `other`, the config of the
        checkpoint being resumed, except the fields in `ignore`."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{flag(name)} {mine[name]!r} (checkpoint: {theirs[name]!r})"
            for name in _fields()
            if name not in ignore and mine[name] != theirs[name]
        ]


_LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


RESUMABLE_CHANGES = frozenset(
    {"model", "dataset", "tokenizer", "val_file", "output", "eval_every", "memory", "device_memory",
     "host_memory", "nvme", "activations", "prefetch", "verify_swap", "checkpoint_every", "keep_checkpoints",
     "portable_checkpoints", "merge_at_end", "report_to", "log_every", "sample_every", "steps", "epochs", "decay_steps",
     "early_stop_patience"}
)
"""Fields a resumed run may change: where things are, budgets, what layers keep for backward (--activations: the
same math either way), how often to eval, save or log, where the metrics go, and how long it runs
(--steps/--epochs/--early-stop-patience: a run extended under the rule of cli/schedule.py; --decay-steps moves the
horizon for the steps still to run). They do not touch the training math (moved model or data files are checked by
content instead). Every other field must equal the checkpoint's, or the continued run would not be the run that
was started."""


def flag(name: str) -> str:
    """The command-line spelling of a field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


def field_help(cls: type = RunConfig) -> dict[str, str]:
    """Each field's docstring (the string literal just below it), used as its --help text. Read by parsing the
    class's file: inspect.getsource tokenizes its way to the class, a tenth of `finetune run --help`'s time."""
    tree = ast.parse(Path(inspect.getfile(cls)).read_text())
    body = next(node.body for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == cls.__name__)
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
    }


def _fields() -> list[str]:
    return [field.name for field in dataclasses.fields(RunConfig)]


@functools.cache
def field_types(cls: type | None = None) -> dict[str, tuple[Any, bool]]:
    """Each field's (type without `| None`, whether None is allowed) of `cls` (default RunConfig): what a config
    file's value is coerced to, and the type of its command-line option."""
    types_ = {}
    for name, kind in typing.get_type_hints(cls or RunConfig).items():
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
        types_[name] = (next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind, optional)
    return types_


def _as_type(value: Any, kind: Any) -> Any:
    """`value` as `kind`, refusing lossy or surprising conversions (a bool for a number, 1.5 for an int)."""
    if isinstance(kind, enum.EnumMeta):
        return kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(value, bool):
        raise TypeError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    if kind is str and isinstance(value, (str, int, float, Path)):
        return str(value)
    raise TypeError(value)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value
