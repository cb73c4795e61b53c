"""Ctrl-C while the CLI imports its libraries: the process ends at once, with one line and exit code 130.

Importing torch and transformers takes seconds. A Ctrl-C in those seconds raises KeyboardInterrupt inside some
import, where Python prints a traceback of import machinery, or where a library's broad `except` swallows it and
the program goes on as if no Ctrl-C had come (measured: `finetune --help` then printed its help and exited 0).
So while they are imported, SIGINT has a handler of its own that ends the process: nothing has been written by
then, so there is nothing to save or clean up. Afterwards the previous handler is back, and a run installs its
own (cli/train.py).

The console script (cli/entry.py) holds it around importing the CLI, which is light (its help needs no torch), and
each command around importing what it needs (`with importing(): from .train import ...`). This module imports
nothing beyond the standard library, so that nothing heavy comes before the handler.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "STOPPED", "importing"]

EXIT_INTERRUPTED = 130  # cli/errors.py's, written out: importing it (and typer with it) is what this guards
STOPPED = "Stopped by Ctrl-C before the run started; nothing was written.\n"


@contextmanager
def importing() -> Iterator[None]:
    """A Ctrl-C inside this block ends the process at once (exit 130, one line on stderr). Only for imports: the
    block must write nothing, since it is not unwound."""
    previous = signal.signal(signal.SIGINT, _stop_while_starting)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_while_starting(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(STOPPED)
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)  # not SystemExit: an import's broad `except` could catch that too
