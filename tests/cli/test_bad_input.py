"""Every bad input of issue 3 (point 8), through the installed script: the exit code, one `Error:` line that
names the value and the fix, no traceback, and the output and checkpoint directories left as they were.

Rows marked `run=True` work on a copy of a real stopped run (`interrupted_run`), so "intact" means byte for
byte: every file of its checkpoints is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_support import Tiny, counting, example_module, run_finetune, write_jsonl

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    """Paths a row's arguments are built from."""

    tmp: Path
    tiny: Tiny
    data: Path
    output: Path


@dataclass
class Case:
    name: str
    args: Callable[[Setup], list]
    expected: tuple[str, ...]
    """Substrings of the error message."""
    code: int = 1
    run: bool = False
    """Work on a copy of a stopped run instead of a new output directory."""
    file_size_limit: int | None = None
    """RLIMIT_FSIZE for the process: writes past it fail as on a full disk."""
    intact: str = "."
    """What must be unchanged afterwards, relative to the run copy."""
    started: bool = False
    """The run started before failing, so a new output directory holds its config and metrics (no checkpoint)."""


def _model_variant(setup: Setup, name: str, config: dict | None) -> Path:
    directory = setup.tmp / name
    directory.mkdir()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "model.safetensors").write_bytes(b"")
    return directory


def _broken_config(setup: Setup) -> Path:
    directory = setup.tmp / "broken"
    shutil.copytree(setup.tiny.model, directory)
    (directory / "config.json").write_text('{"model_type": "llama",')
    return directory


def _t5(setup: Setup) -> Path:
    from transformers import T5Config

    directory = _model_variant(setup, "t5", None)
    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=300).save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def _wider_model(setup: Setup) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup.tiny.model)
    directory = example_module().save_tiny_llama(setup.tmp / "wider", tokenizer, hidden=64, layers=2)
    tokenizer.save_pretrained(directory)
    return directory


def _file(setup: Setup, name: str, text: str) -> Path:
    (setup.tmp / name).write_text(text)
    return setup.tmp / name


def _train(setup: Setup, model: Path | str, data: Path | str, *more: object) -> list:
    return ["run", model, data, "--output", setup.output, "--steps", "2", "--seq-len", "24", *more]


CASES = [
    Case("model-missing", lambda s: _train(s, s.tmp / "no-such-model", s.data), ("model path", "does not exist")),
    Case("model-is-a-file", lambda s: _train(s, s.data, s.data), ("is a file", "config.json")),
    Case("model-config-unreadable", lambda s: _train(s, _broken_config(s), s.data), ("cannot read", "config.json")),
    Case("model-without-config", lambda s: _train(s, _model_variant(s, "empty", None), s.data),
         ("has no config.json",)),
    Case("model-unsupported-architecture",
         lambda s: _train(s, _model_variant(s, "alien", {"model_type": "not-a-model"}), s.data),
         ("architecture 'not-a-model' is not supported", "upgrade transformers")),
    Case("model-not-a-causal-lm", lambda s: _train(s, _t5(s), s.data), ("'t5'", "not a causal language model")),
    Case("model-hub-id-offline", lambda s: _train(s, "some-org/some-model", s.data),
         ("could not be downloaded", "hf download some-org/some-model --local-dir ./some-model")),
    Case("dataset-missing", lambda s: _train(s, s.tiny.model, s.tmp / "missing.jsonl"),
         ("missing.jsonl does not exist",)),
    Case("dataset-empty", lambda s: _train(s, s.tiny.model, _file(s, "empty.jsonl", "")), ("is empty",)),
    Case("dataset-malformed-line",
         lambda s: _train(s, s.tiny.model, _file(s, "bad.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": "thr\n')),
         ("bad.jsonl line 3", "not valid JSON")),
    Case("dataset-unknown-fields",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "qa.jsonl", [{"question": "q", "answer": "a"}])),
         ("cannot tell the format", "fields question, answer")),
    Case("format-missing-fields", lambda s: _train(s, s.tiny.model, s.data, "--format", "chat"),
         ("--format chat needs fields messages", "has text")),
    Case("seq-len-below-prompt",
         lambda s: _train(s, s.tiny.model,
                          write_jsonl(s.tmp / "long.jsonl", [{"prompt": counting(0, 12), "completion": " x"}]),
                          "--seq-len", "4"),
         ("--seq-len 4 is below the prompt", "raise --seq-len to at least")),
    Case("budget-too-small", lambda s: _train(s, s.tiny.model, s.data, "--memory", "1KB"),
         ("--memory 1KB is below the minimum", "raise --memory to at least")),
    Case("nvme-not-writable", lambda s: _train(s, s.tiny.model, s.data, "--nvme", s.data / "swap"),
         ("--nvme", "is not a writable directory")),
    Case("disk-full-in-first-step",
         lambda s: _train(s, s.tiny.model, s.data, *s.tiny.budget_flags(s.tmp / "swap")),
         ("no space left on a disk at step 1", "before the first checkpoint", "run the same command again"),
         file_size_limit=30_000, started=True, intact="checkpoints"),
    Case("disk-full-at-checkpoint", lambda s: ["run", "--resume", "--output", s.output],
         ("no space left to save checkpoint", "is intact", "finetune run --resume --output"),
         run=True, file_size_limit=100_000, intact="checkpoints"),
    Case("resume-different-model",
         lambda s: ["run", _wider_model(s), "--resume", "--output", s.output, "--device-memory", "64MB",
                    "--host-memory", "64MB"],
         ("--resume", "belongs to a different model"), run=True),
    Case("resume-changed-option", lambda s: ["run", "--resume", "--output", s.output, "--lr", "0.5"],
         ("--resume continues the run", "--lr 0.5"), run=True),
    Case("resume-changed-lora", lambda s: ["run", "--resume", "--output", s.output, "--lora"],
         ("--resume continues the run", "--lora True (checkpoint: False)"), run=True),
    Case("lora-targets-unknown",
         lambda s: _train(s, s.tiny.model, s.data, "--lora", "--lora-targets", "q_proj,attention"),
         ("--lora-targets 'attention' matches no module", "down_proj, gate_proj, k_proj", "all-linear")),
    Case("resume-without-checkpoint", lambda s: ["run", "--resume", "--output", s.output], ("no checkpoint in",)),
    Case("output-holds-a-run", lambda s: _train(s, s.tiny.model, s.data), ("already holds a run", "--resume"),
         run=True),
    # More usage errors (each checked value, config files) are tested in process: test_options.py.
    Case("usage-unknown-option", lambda s: _train(s, s.tiny.model, s.data, "--no-such-option"),
         ("No such option",), code=2),
    Case("usage-invalid-values", lambda s: _train(s, s.tiny.model, s.data, "--lr", "-1", "--seq-len", "1"),
         ("--seq-len 1 must be >= 2", "--lr -1.0 must be >= 0"), code=2),
]


def _snapshot(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: a write past `limit` fails with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, tiny: Tiny, learnable: Path, interrupted_run, env, tmp_path: Path) -> None:
    output = tmp_path / "out"
    if case.run:
        shutil.copytree(interrupted_run[0], output)
    setup = Setup(tmp_path, tiny, learnable, output)
    args = case.args(setup)
    before = _snapshot(output / case.intact)
    options = {"preexec_fn": _limit_file_size(case.file_size_limit)} if case.file_size_limit else {}

    result = run_finetune(env, *args, **options)

    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if case.code == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
        message = errors[0]
    else:
        message = " ".join(result.stderr.replace("│", " ").split())
    for expected in case.expected:
        assert expected in message, message
    assert _snapshot(output / case.intact) == before
    if not case.run:
        assert output.exists() == case.started and not (output / "checkpoints").exists()
