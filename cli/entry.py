"""The `finetune` console script's entry point, in a module that imports nothing at its top.

Importing the CLI (torch, transformers) takes seconds. A Ctrl-C in those seconds raises KeyboardInterrupt inside
some import, and without a handler around it Python prints a traceback of import machinery. So this module imports
the CLI inside the handler, and a Ctrl-C at any point before the run takes over its own signals ends with one line
and exit code 130.

This holds because `finetune.cli`'s __init__.py is light (its `app` is loaded on first use): a package __init__
runs before this module, outside the handler.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # cli/errors.py's, written out: importing it (and typer with it) is what this guards


def main() -> int:
    """Import and run the CLI; returns the exit code for `sys.exit`."""
    try:
        from .main import run_script

        return run_script()
    except KeyboardInterrupt:
        print("Stopped by Ctrl-C before the run started; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
