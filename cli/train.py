"""`finetune run`: check everything, then train through the engine, with evals, checkpoints and resume.

The run has two phases. `prepare` reads and checks the model (cli/model.py), tokenizer, data (cli/data.py) and
budget (cli/hardware.py), and writes nothing, so any bad input fails before the output directory is touched.
`train` then builds the engine and is the only writer: run-config.yaml, metrics.jsonl, checkpoints, loss.png.
Training itself is the engine's `train_step`. This module decides only what each step sees (cli/batches.py),
its learning rate (cli/schedule.py), and when to evaluate and save.

Resume is exact. Step s always sees the same batches, the rate is a function of s, and the engine restores
weights, optimizer state and step count. The torch RNG state travels in the checkpoint's `extra`, and so does
the eval history (cli/evals.py) that --keep-best and --early-stop-patience decide by. A run resumed with more
--steps grows: step s does not depend on the run's length, and the rate's decay horizon is saved with the run
(cli/schedule.py's rule), so it equals a run started that long; OUTPUT/final/ is then rewritten.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from ..offload import (
    DEFAULT_PREFETCH,
    Budget,
    ChecksumMismatch,
    Engine,
    format_bytes,
    fsync_directory,
    write_atomic,
)
from .api_words import in_cli_words
from .batches import Batches, eval_batches
from .checkpoints import RUN_CONFIG, Checkpoints, Entry
from .config import RESUMABLE_CHANGES, OptimizerName, RunConfig
from .data import Format, Sequences, detect_format, load_rows, split_rows, tokenize_rows
from .engine_options import compute_dtype, make_optimizer, quantize_frozen
from .errors import FinetuneError, disk_full, one_line
from .evals import EvalHistory
from .export import export_checkpoint
from .hardware import run_budget
from .lora import base_fingerprint, lora_description, wrap_lora
from .model import build_meta_model, load_tokenizer, pad_id, resolve_model, stored_dtype
from .packed_attention import honours_packed_positions
from .progress import (
    Clock,
    MetricsLog,
    RunProgress,
    memory_line,
    memory_record,
    perplexity,
    plot_losses,
    summary_table,
)
from .run_lock import hold_output, output_full, refuse_if_running, swap_name
from .samples import Samples, sample_prompts
from .schedule import LearningRate, Schedule
from .token_cache import TokenCache, default_root
from .tracking import Tracking, check_installed, parse_targets

FINAL = "final"  # OUTPUT/final/: the trained model

__all__ = ["Prepared", "configure", "prepare", "train"]



def configure(values: dict[str, Any], *, resume: bool, checkpoint: str | None = None) -> RunConfig:
    """The effective config: `values` (config file, then flags) over the defaults, or over the saved config of
    the run being resumed.

    Raises:
        ConfigError: invalid values (a usage error).
        FinetuneError: nothing to resume, or a resumed run changes a setting that would change its result.
    """
    if not resume:
        return RunConfig(**values)
    output = Path(values.get("output", RunConfig.output))
    refuse_if_running(output)
    checkpoints = Checkpoints(output)
    entry = checkpoints.latest(checkpoint)
    saved = _saved_config(checkpoints, entry)
    length = {"steps": None, "epochs": None} if {"steps", "epochs"} & values.keys() else {}  # a new length, in either
    config = RunConfig(**{**saved.to_dict(), **length, **values})
    changed = config.differences(saved, ignore=RESUMABLE_CHANGES)
    if changed:
        raise FinetuneError(
            f"--resume continues the run in {output} as it was configured, but these differ: {'; '.join(changed)}; "
            "drop those options, or start a new --output"
        )
    if "decay_steps" in values and config.decay_steps != saved.decay_steps:
        Console(stderr=True).print(
            f"--decay-steps {config.decay_steps}: the rate follows the new horizon from step {entry.step + 1}; steps "
            f"1-{entry.step} keep the rates they ran with (horizon {saved.decay_steps or 'the original --steps'})",
            highlight=False, soft_wrap=True)
    return config


def _saved_config(checkpoints: Checkpoints, entry: Entry) -> RunConfig:
    """The config saved with checkpoint `entry`."""
    return RunConfig(**yaml.safe_load((checkpoints.path(entry) / RUN_CONFIG).read_text()))


@dataclass
class Prepared:
    """A run whose inputs have all been read and checked; nothing has been written yet."""

    config: RunConfig
    resume_from: Entry | None
    model_dir: Path
    model: nn.Module  # on the meta device (with --lora: peft-wrapped, adapters materialised)
    parameters: int
    trainable: int
    tokenizer: Any
    format: Format
    train: Sequences
    val: Sequences | None
    batches: Batches
    total_steps: int
    budget: Budget
    prefetch: int  # --prefetch, else the engine's default; `run` puts the plan's knobs (depth, split) in here
    latest_seen: str | None = None  # the newest checkpoint listed when this was prepared (checked again under the lock)


def prepare(config: RunConfig, *, resume: bool, checkpoint: str | None = None) -> Prepared:
    """Read and check everything `train` needs, cheapest checks first; nothing is written.

    Raises:
        FinetuneError: any bad input (model, data, budget, output), with the fix.
    """
    import transformers

    transformers.logging.set_verbosity_error()  # its advice is for library users; ours is in the errors
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # at import: "pip install kernels" for a CPU kernel
    check_installed(parse_targets(config.report_to))  # --report-to's libraries are optional
    output = Path(config.output)
    checkpoints = Checkpoints(output)
    if output.exists() and not output.is_dir():
        raise FinetuneError(f"--output {output} is a file; pass a directory")
    refuse_if_running(output)
    resume_from = checkpoints.latest(checkpoint) if resume else None
    if resume_from is None and (checkpoints.entries() or (output / FINAL).exists()):  # else nothing to lose
        raise FinetuneError(f"--output {output} already holds a run; pass --resume to continue it, or choose a new "
                            "--output")
    model_dir = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    model = build_meta_model(model_dir, trust_remote_code=config.trust_remote_code)
    if config.lora:
        local = Path(config.model).exists()  # else a hub id: the adapter names it as such
        model = wrap_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          targets=config.lora_targets, seed=config.seed,
                          base_name=str(Path(config.model).resolve()) if local else config.model)
    tokenizer_source = checkpoints.path(resume_from) if resume_from else (config.tokenizer or model_dir)
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=config.trust_remote_code)
    fmt, train_data, val_data = _sequences(config, tokenizer)
    vocab = model.get_input_embeddings().num_embeddings
    largest = train_data.max_id
    if largest >= vocab:
        raise FinetuneError(
            f"the tokenizer gives token id {largest}, but the model's vocabulary has {vocab} entries; use the "
            f"model's own tokenizer (--tokenizer)"
        )
    # Packed examples are kept apart by position restarts, or by an explicit mask where the model ignores those.
    packed_mask = None if not config.pack or honours_packed_positions(model) else compute_dtype(config)
    batches = Batches(train_data, batch_size=config.batch_size, accumulation_steps=config.accumulation_steps,
                      seed=config.seed, pad_id=pad_id(tokenizer), packed_mask=packed_mask)
    total = _total_steps(config, batches, resume_from)
    if config.decay_steps is None:  # the run's length when it started: saved resolved, so it stays when the run grows
        started = _saved_config(checkpoints, resume_from) if resume_from else config  # (saved before --decay-steps)
        config = replace(config, decay_steps=_total_steps(started, batches, None))
    need_device, need_host = Engine.minimum_budget(model, make_optimizer(config), compute_dtype=compute_dtype(config),
                                                   quantize_frozen=quantize_frozen(config),
                                                   accumulation_steps=config.accumulation_steps)
    budget = run_budget(config, need_device, need_host)
    # Counted now: the engine leaves only placeholders.
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Prepared(config, resume_from, model_dir, model, parameters, trainable, tokenizer, fmt, train_data, val_data,
                    batches, total, budget, DEFAULT_PREFETCH if config.prefetch is None else config.prefetch,
                    latest_seen=entries[-1].name if (entries := checkpoints.entries()) else None)


def _total_steps(config: RunConfig, batches: Batches, resumed: Entry | None) -> int:
    """The run's length, from --steps or --epochs. A resumed run may be extended, never cut below the steps it has
    taken (those are in its weights).

    Raises:
        FinetuneError: fewer steps than `resumed` has taken.
    """
    total = config.steps or batches.steps_for_epochs(config.epochs or 1.0)
    if resumed is not None and total < resumed.step:
        asked = f"--steps {total}" if config.steps else f"--epochs {config.epochs or 1.0} ({total} steps)"
        raise FinetuneError(f"{asked} is fewer than the {resumed.step} steps the run has taken (checkpoint "
                            f"{resumed.name}); a run can be extended, not cut back: pass --steps {resumed.step} or "
                            "more")
    return total


def _sequences(config: RunConfig, tokenizer: Any) -> tuple[Format, Sequences, Sequences | None]:
    """The detected format, the training sequences and the validation sequences (None without a split). Separate
    validation data (--val-file, --val-split) has its format detected from its own fields."""
    reading = dict(columns=config.columns, fmt=config.format, text_unit=config.text_unit)
    rows = load_rows(config.dataset, config=config.dataset_config, split=config.split, **reading)
    fmt = detect_format(rows.column_names, config.format, config.dataset)
    val_source = config.val_file or (f"{config.dataset} (split {config.val_split})" if config.val_split else
                                     config.dataset)
    if config.val_file:
        val_rows = load_rows(config.val_file, label="--val-file", **reading)
    elif config.val_split:
        val_rows = load_rows(config.dataset, config=config.dataset_config, split=config.val_split,
                             split_flag="--val-split", **reading)
    else:
        rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    val_fmt = detect_format(val_rows.column_names, config.format, val_source) if val_source != config.dataset else fmt
    options = dict(seq_len=config.seq_len, pack=config.pack, train_on_prompt=config.train_on_prompt,
                   template=config.template, text_unit=config.text_unit)
    cache = TokenCache(default_root(), config, tokenizer)  # a rerun or --resume reads what this run tokenizes
    train_data = cache.sequences("train", config.dataset, fmt.value, rows, lambda directory: tokenize_rows(
        rows, fmt, tokenizer, source=config.dataset, directory=directory, **options))
    val_data = cache.sequences("val", config.val_file or config.dataset, val_fmt.value, val_rows, lambda directory:
                               tokenize_rows(val_rows, val_fmt, tokenizer, source=val_source, directory=directory,
                                             **options)) if len(val_rows) else None
    return fmt, train_data, val_data


# ------------------------------------------------------------------------------------------------ training


class _Interrupts:
    """The first Ctrl-C (or SIGTERM) asks to stop after the current step, with a checkpoint; a second one stops
    at once, with the last complete checkpoint left as it is."""

    def __init__(self, progress: RunProgress) -> None:
        self.requested = False
        self._progress = progress
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._progress.note("Stopping after this step to save a checkpoint (Ctrl-C again to stop at once).")


def train(prepared: Prepared, *, console: Console, quiet: bool) -> dict[str, Any]:
    """Train to the last step, or until interrupted; returns the summary (its "status" says which)."""
    started = time.perf_counter()  # the summary's wall time: evals, checkpoints and the final model included
    config, output = prepared.config, Path(prepared.config.output)
    checkpoints = Checkpoints(output)
    schedule = LearningRate(config.lr, prepared.total_steps, config.warmup_steps, config.schedule, config.min_lr,
                            config.decay_steps)
    # The lock is taken before the engine makes its swap files, and held until every write of the run is done.
    with hold_output(output, prepared.resume_from, prepared.latest_seen), _engine(prepared) as engine:
        restored = _restore(engine, prepared, checkpoints) if prepared.resume_from else _fresh(config)
        start, history = int(restored["step"]), EvalHistory.from_extra(restored.get("evals"))
        _go_back(engine, checkpoints, prepared.resume_from)
        try:
            write_atomic(output / RUN_CONFIG, config.to_yaml())
        except OSError as error:
            if not disk_full(error):
                raise
            raise output_full(output, error) from None
        tracking = Tracking(parse_targets(config.report_to), output, config.to_dict(), start)
        metrics = MetricsLog(output / "metrics.jsonl", resume_step=start, tracking=tracking)
        _describe(prepared, start, engine)
        _note_horizon(prepared, start)
        progress = RunProgress(console, total=prepared.total_steps, start=start, quiet=quiet,
                               log_every=config.log_every)
        clock = Clock()
        held_out = prepared.val if prepared.val is not None else prepared.train
        samples = Samples(sample_prompts(held_out), prepared.tokenizer) if config.sample_every else None
        last_loss, last_eval, saved = math.nan, None, prepared.resume_from
        with tracking, progress, _Interrupts(progress) as interrupts:
            if start == 0 and prepared.val is not None:
                last_eval = _evaluate(engine, prepared, metrics, progress, 0)
            step, stopped = start, history.stalled(config.early_stop_patience)  # resumed after an early stop: done
            for step in range(start + 1, (start if stopped else prepared.total_steps) + 1):
                engine.optimizer.lr = schedule(step)
                micro_batches = prepared.batches.step(step)
                tokens = prepared.batches.tokens(step)
                last_loss = _step(engine, micro_batches, step, checkpoints, clock, tokens, progress.note)
                metrics.write({"step": step, "loss": last_loss, "lr": engine.optimizer.lr, "tokens": tokens,
                               "epoch": round(prepared.batches.epoch_of(step), 4), "tokens_per_s": clock.rate,
                               **({} if engine.grad_norm is None else {"grad_norm": engine.grad_norm}),
                               **memory_record(engine)})
                progress.update(step, last_loss, clock.rate, memory_line(engine), engine.optimizer.lr)
                last = step == prepared.total_steps
                due = last or config.eval_every > 0 and step % config.eval_every == 0
                evaluated = prepared.val is not None and due
                if evaluated:
                    last_eval = _evaluate(engine, prepared, metrics, progress, step)
                if samples is not None and step % config.sample_every == 0:
                    _sample(engine, samples, metrics, progress, step)
                best = evaluated and history.add(step, last_eval) and config.keep_best  # a checkpoint to keep
                stopped = history.stalled(config.early_stop_patience)
                if stopped and not last:
                    progress.note(f"step {step}: no better eval loss in {config.early_stop_patience} evals; stopping")
                if last or stopped or best or interrupts.requested or (config.checkpoint_every and
                                                                       step % config.checkpoint_every == 0):
                    saved = _save(engine, prepared, checkpoints, step, clock, final=last or stopped, history=history,
                                  best=best)
                    progress.note(f"checkpoint {checkpoints.path(saved)}"
                                  + (f" (its state stays in the swap files in {saved.swap})" if saved.swap else ""))
                if interrupts.requested or stopped:
                    break
        metrics.close()
        plot_losses(output / "metrics.jsonl", output / "loss.png",
                    title=f"{Path(config.model).name}: {step} of {prepared.total_steps} steps")
        stats = engine.stats()
        final = None
        if step == prepared.total_steps or stopped:
            source = (config.keep_best and _best_checkpoint(checkpoints, history)) or saved
            final = _write_final(prepared, checkpoints.path(source), output, rewrite=step > start)
            if config.keep_checkpoints == 0:  # the run wanted only its final model
                checkpoints.clear(engine)
                saved = None
    summary = _summary(prepared, checkpoints, stats, clock, step=step, train_loss=last_loss, eval_loss=last_eval,
                       saved=saved, wall_seconds=time.perf_counter() - started, stopped=stopped)
    if final is not None:
        summary["final"] = str(final)
    if config.keep_best and history.best is not None:
        summary["best_step"], summary["best_eval_loss"] = history.best
        kept = _best_checkpoint(checkpoints, history)  # None once --keep-checkpoints 0 has dropped it
        summary["best_checkpoint"] = str(checkpoints.path(kept)) if kept else None
    if not quiet:
        console.print(summary_table(summary))
    return summary


def _summary(prepared: Prepared, checkpoints: Checkpoints, stats: dict[str, int], clock: Clock, *, step: int,
             train_loss: float, eval_loss: float | None, saved: Entry | None,
             wall_seconds: float, stopped: bool = False) -> dict[str, Any]:
    """What the run did, for the table or --json, with the command to run next (resume, or export). The eval
    rows are there only when this process evaluated (there is a validation set). `stopped`: by
    --early-stop-patience, at `step`."""
    output = Path(prepared.config.output)
    finished = step == prepared.total_steps or stopped
    evaluated = {} if eval_loss is None else {"eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)}
    summary = {
        "status": "completed" if step == prepared.total_steps else "early-stopped" if stopped else "interrupted",
        "format": prepared.format.value,
        "step": step,
        "total_steps": prepared.total_steps,
        "train_loss": train_loss,
        **evaluated,
        "tokens": clock.tokens,
        "wall_seconds": wall_seconds,
        "train_seconds": clock.elapsed,  # in train_step only
        "step_seconds": clock.step_seconds,
        "tokens_per_s": clock.rate,
        "peak_device": stats["peak_device"],
        "peak_host": stats["peak_host"],
        "nvme_read": stats["bytes_read"],
        "nvme_written": stats["bytes_written"],
        **({"skipped_steps": stats["skipped_steps"]} if stats["skipped_steps"] else {}),  # gradients not finite
        "checkpoint": str(checkpoints.path(saved)) if saved else None,
        "metrics": str(output / "metrics.jsonl"),
        "loss_curve": str(output / "loss.png"),
    }
    if not finished:
        summary["resume"] = f"finetune run --resume --output {output}"
    elif saved and prepared.config.lora:
        summary["export"] = f"finetune export {checkpoints.path(saved)} ADAPTER_DIR"
        summary["export_merged"] = f"finetune export {checkpoints.path(saved)} MODEL_DIR --merge"
    elif saved:
        summary["export"] = f"finetune export {checkpoints.path(saved)} EXPORT_DIR"
    return summary


def _write_final(prepared: Prepared, checkpoint: Path, output: Path, *, rewrite: bool) -> Path:
    """OUTPUT/final/: the trained model as a Hugging Face directory in the model's own dtype (with --lora the peft
    adapter, in fp32 as peft keeps it, or with --merge-at-end the base with the adapters merged in), written from
    the run's last (or with --keep-best its best) checkpoint (portable) as `finetune export` writes it.

    `rewrite`: this process trained (a run extended, or resumed to its end), so an existing final/ is out of
    date. The new one is exported to OUTPUT/.final.next (which appears only once complete) and swapped in by two
    renames. A process killed before or between them leaves .final.next, which the next --resume swaps in.
    """
    final, written, old = output / FINAL, output / f".{FINAL}.next", output / f".{FINAL}.old"
    if rewrite or not (final.exists() or written.exists()):  # else an earlier process wrote it for this step
        for leftover in (written, old):
            shutil.rmtree(leftover, ignore_errors=True)
        _export_final(prepared, checkpoint, written, final)
    if written.exists():
        if final.exists():
            final.rename(old)
        written.rename(final)
        fsync_directory(output)  # the renames last before the old copy goes
    shutil.rmtree(old, ignore_errors=True)
    return final


def _export_final(prepared: Prepared, checkpoint: Path, written: Path, final: Path) -> None:
    config = prepared.config
    dtype = None if config.lora else stored_dtype(prepared.model)
    try:
        export_checkpoint(checkpoint, written, dtype, merge=config.merge_at_end)
    except OSError as error:
        if not disk_full(error):
            raise
        raise FinetuneError(f"no space left to write {final} ({error.strerror}); the run's checkpoint "
                            f"{checkpoint} is intact: free space, then run: finetune export {checkpoint} {final}"
                            + (" --merge" if config.merge_at_end else "")) from None


def _best_checkpoint(checkpoints: Checkpoints, history: EvalHistory) -> Entry | None:
    """The kept checkpoint of the lowest eval loss (--keep-best), or None (no eval yet, or dropped)."""
    best = history.best
    return next((e for e in checkpoints.entries() if best is not None and e.step == best[0]), None)


def _engine(prepared: Prepared) -> Engine:
    config = prepared.config
    checkpoints = Checkpoints(Path(config.output))  # those in swap keep their swap files
    try:
        return Engine(
            prepared.model,
            make_optimizer(config),
            prepared.budget,
            prefetch=prepared.prefetch,  # the plan's or --prefetch
            max_grad_norm=None if config.optimizer is OptimizerName.MEZO else config.max_grad_norm or None,
            clip_mode=config.clip_mode,
            activations=config.activations,
            compute_dtype=compute_dtype(config),
            weights=prepared.model_dir,
            quantize_frozen=quantize_frozen(config),
            run_name=swap_name(Path(config.output)),
            verify_swap=config.verify_swap,
            checkpoints=[checkpoints.path(entry) for entry in checkpoints.entries()],
        )
    except PermissionError as error:  # a swap directory of this name that is not ours alone
        message = in_cli_words(one_line(str(error))).replace("another swap directory", "another --nvme")
        raise FinetuneError(f"--nvme {config.nvme}: {message}") from None
    except ValueError as error:  # the engine's own checks (budget, architecture) name the fix, in its API's words
        raise FinetuneError(f"cannot stream {prepared.model_dir}: {in_cli_words(one_line(str(error)))}") from None
    except OSError as error:
        if disk_full(error):
            raise FinetuneError(
                f"no space left for the swap files in --nvme {config.nvme} ({error.strerror}); free space there or "
                "pass another --nvme"
            ) from None
        raise


def _fresh(config: RunConfig) -> dict[str, Any]:
    """Seed a new run; returns the `extra` of its (absent) checkpoint: step 0, no evals."""
    torch.manual_seed(config.seed)
    return {"step": 0}


def _restore(engine: Engine, prepared: Prepared, checkpoints: Checkpoints) -> dict[str, Any]:
    """Load the latest checkpoint into `engine`, check it saw the same data (and, for adapters, base), restore
    the RNG; returns its `extra` (its step, its eval history)."""
    directory = checkpoints.path(prepared.resume_from)
    needs, ours = prepared.resume_from.swap, engine.swap_directory
    if needs is not None and (ours is None or Path(needs).resolve() != ours.resolve()):
        moved = ours is not None and Path(needs).parent.resolve() == ours.parent.resolve()
        fix = ("those belong to the run at the --output it was started with, and stay with it: resume it there "
               "(checkpoints stand alone with --portable-checkpoints)") if moved else \
            f"resume with --nvme {Path(needs).parent}"
        raise FinetuneError(f"--resume: checkpoint {directory} keeps its state in the swap files in {needs}; {fix}")
    try:
        extra = engine.load_checkpoint(directory)
    except ChecksumMismatch as error:
        raise FinetuneError(f"--resume: checkpoint {directory} is damaged: {error}; "
                            f"{checkpoints.fallback(prepared.resume_from)}") from None
    except ValueError as error:
        raise FinetuneError(f"--resume: {in_cli_words(one_line(str(error)))}") from None
    if extra.get("data") != prepared.train.fingerprint():
        raise FinetuneError(
            f"--resume: the dataset {prepared.config.dataset} is not the data checkpoint {directory} was trained on "
            "(its tokens differ); resume with the same data and tokenizer, or start a new --output"
        )
    if "base" in extra and extra["base"] != base_fingerprint(prepared.model_dir):
        raise FinetuneError(
            f"--resume: the base model {prepared.config.model} is not the one the adapters in {directory} were "
            "trained on (its weights differ); resume with that MODEL, or start a new --output"
        )
    torch.set_rng_state(extra["rng"]["cpu"])
    if torch.cuda.is_available() and extra["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return extra


def _go_back(engine: Engine, checkpoints: Checkpoints, resumed: Entry | None) -> None:
    """A run resumed from an earlier checkpoint than its latest (`--resume-from`) continues from there: the later
    checkpoints are dropped, now that the earlier one has loaded, so that they do not stand for this run's steps."""
    dropped = checkpoints.drop_after(engine, resumed) if resumed is not None else []
    if dropped:
        Console(stderr=True).print(f"going back to {resumed.name}: removed the later checkpoint(s) "
                                   f"{', '.join(dropped)}", highlight=False, soft_wrap=True)


def _step(engine: Engine, micro_batches: list[dict[str, torch.Tensor]], step: int, checkpoints: Checkpoints,
          clock: Clock, tokens: int, note: Callable[[str], None]) -> float:
    """One engine step; a full disk or a diverged loss ends the run with the last checkpoint named. A step the
    engine skipped (a finite loss, a gradient norm that is not finite) is noted once, and the run goes on."""
    started = time.perf_counter()
    skipped = engine.stats()["skipped_steps"]
    try:
        with warnings.catch_warnings():  # the engine's own warning of a skipped step: noted below in the CLI's words
            warnings.filterwarnings("ignore", message=r"Engine: step \d+ was skipped", category=RuntimeWarning)
            loss = engine.train_step(micro_batches)
    except OSError as error:
        if not disk_full(error):
            raise
        entries = checkpoints.entries()
        then = (f"the last checkpoint {checkpoints.path(entries[-1])} is intact; free space on --nvme and --output, "
                f"then run: finetune run --resume --output {checkpoints.output}") if entries else \
            "this was before the first checkpoint; free space on --nvme and --output and run the same command again"
        raise FinetuneError(f"no space left on a disk at step {step} ({error.strerror}); {then}") from None
    clock.add(tokens, time.perf_counter() - started)
    if not math.isfinite(loss):
        raise FinetuneError(f"the loss is {loss} at step {step}; lower --lr or raise --warmup-steps and start a new "
                            "run")
    if engine.stats()["skipped_steps"] > skipped:
        note(f"warning: step {step} skipped: its gradient norm is not finite (loss {loss:.4f}); the weights and "
             "optimizer state are as before it, the run goes on")
    return loss


def _evaluate(engine: Engine, prepared: Prepared, metrics: MetricsLog, progress: RunProgress, step: int) -> float:
    """Per-token mean loss over the whole validation set (recorded with its perplexity)."""
    total, count = 0.0, 0
    for batch, targets in eval_batches(prepared.val, prepared.config.batch_size, pad_id(prepared.tokenizer),
                                       packed_mask=prepared.batches.packed_mask):
        total += engine.eval_loss(batch) * targets
        count += targets
    loss = total / count
    metrics.write({"step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss)})
    progress.note(f"step {step}: eval loss {loss:.4f} · perplexity {perplexity(loss):.2f}")
    return loss


def _sample(engine: Engine, samples: Samples, metrics: MetricsLog, progress: RunProgress, step: int) -> None:
    """--sample-every: completions of the held-out prompts, in metrics.jsonl and above the progress bar."""
    generated = samples.generate(engine)
    metrics.write({"step": step, "samples": generated})
    for sample in generated:
        progress.note(f"step {step} sample: {sample['prompt']!r} -> {sample['completion']!r}")


def _save(engine: Engine, prepared: Prepared, checkpoints: Checkpoints, step: int, clock: Clock, *,
          final: bool, history: EvalHistory, best: bool) -> Entry:
    """Checkpoint `step` with what a resume needs in its `extra`. `best`: the new best eval of --keep-best,
    saved portable, because it must outlive the swap files (a finished run drops those) and final/ is exported
    from it."""
    extra = {
        "step": step,
        "data": prepared.train.fingerprint(),
        "sequences_seen": step * prepared.batches.per_step,
        "schedule": {"name": prepared.config.schedule.value, "lr": engine.optimizer.lr},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "tokens": clock.tokens,
        "evals": history.to_extra(),  # --keep-best's best and --early-stop-patience's count, after a resume
    }
    if prepared.config.lora:  # the checkpoint does not hold the base: remember which one it was
        extra["base"] = base_fingerprint(prepared.model_dir)
    return checkpoints.save(engine, step, extra=extra, tokenizer=prepared.tokenizer,
                            run_config=prepared.config.to_yaml(), keep=prepared.config.keep_checkpoints,
                            portable=prepared.config.portable_checkpoints or best, final=final,
                            best=history.best[0] if prepared.config.keep_best and history.best else None)


def _describe(prepared: Prepared, start: int, engine: Engine) -> None:
    """What is about to run, on stderr (diagnostics, not results)."""
    config = prepared.config
    val = f", {len(prepared.val)} validation" if prepared.val is not None else ""
    where = f"resuming at step {start} from {prepared.resume_from.name}" if prepared.resume_from else "starting"
    lora = f" ({lora_description(prepared.model, config.qlora)}: {prepared.trainable / 1e6:.2f}M trainable)" \
        if config.lora else ""
    Console(stderr=True).print(
        f"{config.model}: {prepared.parameters / 1e6:.2f}M parameters{lora} · {len(prepared.train)} training "
        f"sequences{val} · {prepared.total_steps} steps of {prepared.batches.per_step} sequences · {where}",
        highlight=False, soft_wrap=True,
    )
    if engine.swap_reclaimed:
        Console(stderr=True).print(
            f"removed {format_bytes(engine.swap_reclaimed)} of swap files that a stopped process of this run left in "
            f"{engine.swap_directory}", highlight=False, soft_wrap=True,
        )


def _note_horizon(prepared: Prepared, start: int) -> None:
    """Say once, on stderr, that a resumed run's steps past its decay horizon run at --min-lr (cli/schedule.py's
    rule for a run that grows), and how to stretch the decay instead."""
    config, total = prepared.config, prepared.total_steps
    first = max(start, config.decay_steps) + 1
    if prepared.resume_from is None or config.schedule is Schedule.CONSTANT or first > total:
        return
    Console(stderr=True).print(
        f"steps {first}-{total} are past the decay horizon (--decay-steps {config.decay_steps}): the new steps run at "
        f"--min-lr {config.min_lr:g}; pass --decay-steps {total} to stretch the decay", highlight=False, soft_wrap=True)
