"""Expected failures: one line on stderr, exit code 1, no traceback.

Someone who passed a wrong path or a malformed dataset needs to know what is wrong, with which value, and how to
fix it. A traceback buries that under frames of library code, so expected failures raise `FinetuneError` with
the whole report as the message. Bugs are not caught here and still show their traceback.

Each check raises where its input is read. The checks of the input all run before the run writes anything, so
a bad input leaves the output directory as it was. A disk that fills up during training leaves every
checkpoint in the manifest intact (cli/checkpoints.py).

    bad input                                     checked in         tested in tests/cli/test_bad_input.py
    model path missing, a file, unreadable        model.py           model-missing, -is-a-file, -config-unreadable
    directory without config.json or weights      model.py           model-without-config
    config.json valid JSON but not an object      model.py           model-config-not-an-object
    safetensors truncated, header damaged, zeros  model.py           model-weights-truncated, -header-length,
                                                                     -header-json, -zero-filled
    a tensor of another shape than config.json's  model.py           model-weights-wrong-shape
    unsupported architecture / not a causal LM    model.py, engine   model-unsupported-architecture, -not-a-causal-lm
    hub id while offline (names where to put it)  model.py           model-hub-id-offline
    dataset missing, empty, malformed line N      sources.py         dataset-missing, -empty, -malformed-line
    dataset without read permission               sources.py         dataset-unreadable (not as root), test_data.py
    dataset line N not UTF-8 (names iconv)        sources.py         dataset-not-utf8
    chat message with an unknown role             data.py            dataset-chat-unknown-role, test_data.py
    ShareGPT message with an unknown `from`       data.py            dataset-sharegpt-unknown-role, test_data.py
    unknown format (lists the fields found)       data.py            dataset-unknown-fields, format-missing-fields
    --columns: a column not there, malformed      data.py, config.py dataset-columns-missing, usage-columns-malformed
    a directory's files in different formats      data.py            dataset-dir-mixed-formats
    unknown --split/--val-split/--dataset-config, sources.py         dataset-unknown-split, -config-missing,
      none chosen among several (lists them)                         -unknown-config, test_sources.py
    hub dataset offline or unreachable: at once,  sources.py         dataset-hub-offline, test_sources.py
      not after retries (names hf download)
    --val-file: own format, errors name the file  data.py, sources   val-file-unknown-fields, -malformed-line
    --template that cannot apply                  data.py            template-chat-without-chat-template,
                                                                     template-not-for-this-format
    --seq-len below a prompt                      sequences.py       seq-len-below-prompt
    budget below the minimum (gives it)           hardware.py        budget-too-small
    --nvme not writable                           hardware.py        nvme-not-writable
    disk full during the run                      train.py           disk-full-*
    resume: other model, changed options, none    train.py, engine   resume-*, output-holds-a-run
    --output in use by a live run (names its pid)  run_lock.py       tests/cli/test_concurrency.py
    --output disk full at the first write         run_lock.py        tests/cli/test_run_lock.py
    a link or another's directory in --nvme       offload/swap_area  tests/cli/test_concurrency.py, test_swap_area.py
    a damaged checkpoint file (names it and the   checkpoints.py,    tests/cli/test_damaged_checkpoint.py
      checkpoint before it)                       offload/checksums
    a damaged or missing swap version of a        offload/checkpoint tests/cli/test_damaged_checkpoint.py,
      checkpoint in swap (names file and chunk)                      tests/offload/test_checkpoint.py
    export, or resume of a copy, of a checkpoint  export.py,         tests/cli/test_damaged_checkpoint.py
      in swap (names --portable-checkpoints)      train.py
    --lora-targets naming no linear layer         lora.py            lora-targets-unknown
    export --merge: no adapter, no base, misfit   export.py          tests/cli/test_lora_cli.py
    resume: LoRA adapters on another base         train.py, lora.py  tests/cli/test_lora_cli.py
    invalid option values, nan/inf (exit 2)       config.py          usage-*, test_options.py
    usage errors as one `Error:` line (exit 2)    main.py            usage-*, test_options.py
    Ctrl-C while importing (exit 130, one line)   startup.py         test_options.py
    --optimizer-args: unknown name, bad value     optimizer_args.py  test_optimizer_args.py
    engine refusals in its API's words (names     api_words.py,      test_api_words.py
      Budget.nvme): passed on with the flags      train.py

Usage errors (exit 2) come from typer (click) and from `ConfigError`; the console script (cli/entry.py, then
`main.run_script`) prints them as one `Error:` line too, so a script reads every failure from the last line of
stderr.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "FinetuneError", "disk_full", "exit_on_failure", "one_line"]

EXIT_FAILURE = 1  # usage errors exit with 2, as typer (click) makes them
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FinetuneError(Exception):
    """An expected failure caused by the input or the machine. The message is the whole report: what failed,
    which value, and how to fix it."""


def disk_full(error: BaseException) -> bool:
    """True for the errors a full disk (or quota, or file size limit) gives; these get a message that names
    the disk rather than a traceback."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL


def one_line(message: str) -> str:
    """Collapse a message onto one line. Library messages sometimes span several lines, and the contract with
    the user (and scripts that grep stderr) is one."""
    return " ".join(message.split())


@contextmanager
def exit_on_failure() -> Iterator[None]:
    """Turn a `FinetuneError` into `Error: <message>` on stderr and exit code 1."""
    try:
        yield
    except FinetuneError as error:
        typer.echo(f"Error: {one_line(str(error))}", err=True)
        sys.stderr.flush()
        raise typer.Exit(EXIT_FAILURE) from None
