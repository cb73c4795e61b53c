"""The `finetune` console script's entry point, in a module that imports nothing heavy at its top.

A Ctrl-C while the CLI is imported ends the process at once with one line and exit code 130 (cli/startup.py says
why). This holds because `finetune.cli`'s __init__.py is light (its `app` is loaded on first use): a package
__init__ runs before this module, outside the handler.
"""

from __future__ import annotations

import sys

from .startup import EXIT_INTERRUPTED, STOPPED, importing


def main() -> int:
    """Import and run the CLI; returns the exit code for `sys.exit`."""
    with importing():
        from .main import run_script
    try:
        return run_script()
    except KeyboardInterrupt:  # after the import, before a command's own handling of Ctrl-C
        sys.stderr.write(STOPPED)
        return EXIT_INTERRUPTED
