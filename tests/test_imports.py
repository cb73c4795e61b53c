"""What importing costs: the command line's help needs no torch, and the packages' public names load on first use.

`finetune --help` took 2.9 s when `import finetune.cli.main` imported torch (issue 15); without it, 0.5 s. The test
checks the cause, not the time: which modules a fresh interpreter has after the import.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "datasets", "numpy", "peft", "finetune.offload.engine")
"""Modules the help must not wait for."""


def _imported_after(statement: str) -> list[str]:
    """The HEAVY modules in sys.modules after `statement`, run in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])  # the last line: after any help the statement printed


@pytest.mark.parametrize("statement", [
    "import finetune.cli.main",
    "from finetune.cli.config import RunConfig, field_help; field_help(RunConfig)",
    "from finetune.offload import ClipMode, format_bytes, parse_size",
])
def test_the_command_line_imports_no_torch(statement: str) -> None:
    assert _imported_after(statement) == []


def test_help_imports_no_torch() -> None:
    """`finetune run --help` in process: the help of every option is rendered, and nothing heavy came with it."""
    code = "from finetune.cli.main import run_script\nrun_script(['run', '--help'])"
    assert _imported_after(code) == []


@pytest.mark.parametrize("package", ["finetune.offload", "finetune.optim"])
def test_every_public_name_loads(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, missing
    assert set(module.__all__) <= set(dir(module))


def test_no_public_name_is_also_a_module_name() -> None:
    """Importing a submodule sets the package's attribute of that name to the module, which would hide a lazily
    loaded function of the same name (`offload.meta_model` was one: its module is now meta_device.py)."""
    offload = importlib.import_module("finetune.offload")
    modules = {path.stem for path in Path(offload.__file__).parent.glob("*.py")}
    assert not modules & set(offload.__all__), modules & set(offload.__all__)
