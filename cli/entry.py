"""The `finetune` console script's entry point, in a module that imports nothing at its top.

Importing the CLI (torch, transformers) takes seconds. A Ctrl-C in those seconds raises KeyboardInterrupt inside
some import, where Python prints a traceback of import machinery, or where a library's broad `except` swallows it
and the program goes on as if no Ctrl-C had come (measured: `finetune --help` then printed its help and exited 0).
So while the CLI is imported, SIGINT has a handler of its own that ends the process at once with one line and
exit code 130: nothing has been written by then, so there is nothing to save or clean up. Once imported, the
default handler is back, and the run installs its own (cli/train.py).

This holds because `finetune.cli`'s __init__.py is light (its `app` is loaded on first use): a package __init__
runs before this module, outside the handler.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130  # cli/errors.py's, written out: importing it (and typer with it) is what this guards
STOPPED = "Stopped by Ctrl-C before the run started; nothing was written.\n"


def main() -> int:
    """Import and run the CLI; returns the exit code for `sys.exit`."""
    previous = signal.signal(signal.SIGINT, _stop_while_starting)
    try:
        from .main import run_script
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        return run_script()
    except KeyboardInterrupt:  # after the import, before a command's own handling of Ctrl-C
        sys.stderr.write(STOPPED)
        return EXIT_INTERRUPTED


def _stop_while_starting(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(STOPPED)
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)  # not SystemExit: an import's broad `except` could catch that too
