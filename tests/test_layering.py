"""The package's structure, checked from the source (ast), so that it stays as docs/architecture.md draws it.

- Packages are layered bottom up, `optim` <- `offload` <- `cli`: a lower one never imports a higher one.
- Inside `offload`, the low-level modules (memory, files, I/O, chunks, store) never import the high-level ones
  (block state, residency, the steps, export, checkpoints, the engine).
- No import cycle between modules.
- No private reach: no module imports a leading-underscore name from another module, and no code touches another
  object's `_attribute` (only its own, through `self` or `cls`). Tests and benchmarks are held to this too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["optim", "offload", "cli"]  # bottom up
OFFLOAD_HIGH = {
    "block_layout", "floors", "block_state", "binding", "residency", "clipping", "updates", "recompute",
    "first_order", "outer_holds", "zeroth_order", "model_export", "checkpoint", "engine", "merge", "traffic",
    "cost_model", "rates", "load_stall", "tuning", "generation", "activations", "activation_choice", "vertical",
}
"""offload's high-level modules; every other offload module is low-level and may not import these."""

PRIVATE_ALLOWED = {
    # transformers' GradientCheckpointingLayer takes its checkpoint function in this attribute and offers no setter.
    ("offload/engine.py", "_gradient_checkpointing_func"),
    # torch has no public reference count of a storage: the activation store needs one to know that autograd let go
    # of every view of a buffer before it hands the buffer to another tensor.
    ("offload/activations.py", "_storage_Use_Count"),
    ("offload/activations.py", "_cdata"),
    ("offload/activations.py", "_C"),
    # os._exit is the standard library's public exit-without-unwinding (a Ctrl-C while importing: cli/startup.py).
    ("cli/startup.py", "_exit"),
}

NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public methods that start with "_" to avoid field names


def _library_modules() -> dict[str, Path]:
    """Dotted module name (finetune.offload.store, finetune.offload for __init__) -> file."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"finetune.{package}" if path.stem == "__init__" else f"finetune.{package}.{path.stem}"
            modules[name] = path
    return modules


def _imports(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for each import of a `finetune` module in `path`."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("finetune"):
                yield target, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("finetune"):
                    yield alias.name, [], node.lineno


def _edges() -> dict[str, set[str]]:
    """Module -> the modules it imports (a name imported from a package that is a submodule counts as that
    submodule: `from . import optim`)."""
    modules = _library_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(name, path):
            submodules = {f"{target}.{n}" for n in names} & modules.keys()
            edges[name] |= submodules or ({target} & modules.keys())
    return edges


def _layer(module: str) -> int:
    return PACKAGES.index(module.split(".")[1])


def test_packages_import_only_downwards() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in _edges().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, upward


def test_offload_low_level_modules_do_not_import_high_level_ones() -> None:
    high = {f"finetune.offload.{name}" for name in OFFLOAD_HIGH}
    assert high <= _library_modules().keys(), sorted(high - _library_modules().keys())  # the list is kept up to date
    upward = [
        f"{module} (low-level) imports {target} (high-level)"
        for module, targets in _edges().items()
        if module.startswith("finetune.offload.") and module not in high
        for target in targets
        if target in high
    ]
    assert not upward, upward


def test_no_import_cycle() -> None:
    edges = _edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def _checked_files() -> list[Path]:
    folders = PACKAGES + ["tests", "benchmarks", "examples"]
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and not dunder and name not in NAMEDTUPLE_API


@pytest.mark.parametrize("path", _checked_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_private_reach(path: Path) -> None:
    relative = str(path.relative_to(ROOT))
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), relative)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("finetune")):
            problems += [f"line {node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
        if isinstance(node, ast.Attribute) and _private(node.attr) and (relative, node.attr) not in PRIVATE_ALLOWED:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                problems.append(f"line {node.lineno}: touches {ast.unparse(node)}")
    assert not problems, problems
