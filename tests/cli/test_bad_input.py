"""Every bad input of issue 3 (point 8) and issue 16, through the console script's function (in this process, or
as the installed script where a row needs a process of its own): the exit code, one `Error:`
line (usage errors included) that names the value and the fix, no traceback, and the output and checkpoint
directories left as they were.

Rows marked `run=True` work on a copy of a real stopped run (`interrupted_run`), so "intact" means byte for
byte: every file of its checkpoints is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_support import Tiny, counting, example_module, run_finetune, run_in_process, write_jsonl

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
    marks: list = field(default_factory=list)
    """pytest marks of the row (a skip where the machine cannot produce the input)."""


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


def _model_copy(setup: Setup, name: str, change: Callable[[Path], None], file: str = "model.safetensors") -> Path:
    """A copy of the tiny model with `change` applied to one of its files."""
    directory = setup.tmp / name
    shutil.copytree(setup.tiny.model, directory)
    change(directory / file)
    return directory


def _cut_mid_data(path: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + length + (len(data) - 8 - length) // 2])


def _replace_bytes(start: int, new: bytes) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:start] + new + data[start + len(new):])

    return change


def _zero_fill(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _narrow_up_proj(path: Path) -> None:
    """model.layers.0.mlp.up_proj.weight as [16, 32] where config.json makes it [85, 32]."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, path, metadata={"format": "pt"})


def _unreadable(setup: Setup) -> Path:
    path = shutil.copy(setup.data, setup.tmp / "locked.jsonl")
    os.chmod(path, 0)
    return Path(path)


_AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode; test_data.py covers "
                              "this check in process")


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


def _file(setup: Setup, name: str, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        (setup.tmp / name).write_bytes(text)
    else:
        (setup.tmp / name).write_text(text)
    return setup.tmp / name


def _without_chat_template(setup: Setup) -> Path:
    """The tiny model's tokenizer, without its chat template."""
    directory = setup.tmp / "plain-tokenizer"
    directory.mkdir()
    shutil.copy(setup.tiny.model / "tokenizer.json", directory)
    settings = json.loads((setup.tiny.model / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


def _split_dir(setup: Setup) -> Path:
    directory = setup.tmp / "splits"
    directory.mkdir()
    for split in ("train", "test"):
        write_jsonl(directory / f"{split}.jsonl", [{"text": counting(0, 8)}] * 4)
    return directory


def _hub_style(setup: Setup) -> Path:
    from test_sources import hub_style_directory

    return hub_style_directory(setup.tmp / "counting")


def _mixed_dir(setup: Setup) -> Path:
    directory = setup.tmp / "mixed"
    directory.mkdir()
    write_jsonl(directory / "chat.jsonl", [{"messages": [{"role": "user", "content": "one"},
                                                         {"role": "assistant", "content": "two"}]}])
    (directory / "notes.txt").write_text(counting(0, 8) + "\n")
    return directory


def _train(setup: Setup, model: Path | str, data: Path | str, *more: object) -> list:
    return ["run", model, data, "--output", setup.output, "--steps", "2", "--seq-len", "24", *more]


CASES = [
    Case("model-missing", lambda s: _train(s, s.tmp / "no-such-model", s.data), ("model path", "does not exist")),
    Case("model-is-a-file", lambda s: _train(s, s.data, s.data), ("is a file", "config.json")),
    Case("model-config-unreadable", lambda s: _train(s, _broken_config(s), s.data), ("cannot read", "config.json")),
    Case("model-without-config", lambda s: _train(s, _model_variant(s, "empty", None), s.data),
         ("has no config.json",)),
    Case("model-config-not-an-object",
         lambda s: _train(s, _model_copy(s, "listed", lambda p: p.write_text("[1, 2]"), "config.json"), s.data),
         ("config.json holds a JSON array, not an object of settings", "restore the file")),
    Case("model-weights-truncated", lambda s: _train(s, _model_copy(s, "cut", _cut_mid_data), s.data),
         ("model.safetensors is truncated", "download or save the weights again")),
    Case("model-weights-header-length",
         lambda s: _train(s, _model_copy(s, "long", _replace_bytes(0, struct.pack("<Q", 2**40))), s.data),
         ("model.safetensors is not a valid safetensors file", "header length 1099511627776 does not fit",
          "download or save the weights again")),
    Case("model-weights-header-json", lambda s: _train(s, _model_copy(s, "garbled", _replace_bytes(8, b"#")), s.data),
         ("model.safetensors is not a valid safetensors file (its header is not valid JSON)",)),
    Case("model-weights-zero-filled", lambda s: _train(s, _model_copy(s, "zeros", _zero_fill), s.data),
         ("model.safetensors is not a valid safetensors file (its header length is 0, too short",)),
    Case("model-weights-wrong-shape", lambda s: _train(s, _model_copy(s, "narrow", _narrow_up_proj), s.data),
         ("model.safetensors: tensor model.layers.0.mlp.up_proj.weight has shape [16, 32]", "makes it [85, 32]",
          "config.json")),
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
    Case("dataset-unreadable", lambda s: _train(s, s.tiny.model, _unreadable(s)),
         ("locked.jsonl is not readable (permission denied)", "chmod a+r"), marks=[_AS_ROOT]),
    Case("dataset-not-utf8",
         lambda s: _train(s, s.tiny.model, _file(s, "latin1.jsonl", '{"text": "one"}\n{"text": "caf\xe9"}\n'
                                                 .encode("latin-1"))),
         ("latin1.jsonl line 2: not UTF-8 (byte 0xe9 at column 14)", "iconv -f latin1 -t utf-8")),
    Case("dataset-chat-unknown-role",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "chat.jsonl", [{"messages": [
             {"role": "wizard", "content": "one"}, {"role": "assistant", "content": "two"}]}])),
         ("chat.jsonl row 1: a message has role 'wizard'", "use one of system, user, assistant, tool")),
    Case("dataset-unknown-fields",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "qa.jsonl", [{"question": "q", "answer": "a"}])),
         ("cannot tell the format", "fields question, answer")),
    Case("format-missing-fields", lambda s: _train(s, s.tiny.model, s.data, "--format", "chat"),
         ("--format chat needs fields messages", "has text")),
    Case("dataset-sharegpt-unknown-role",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "sharegpt.jsonl", [{"conversations": [
             {"from": "human", "value": "one"}, {"from": "gpt", "value": "two"}]}] * 2 + [{"conversations": [
                 {"from": "human", "value": "one"}, {"from": "bot", "value": "two"}]}])),
         ("sharegpt.jsonl row 3: a message has from 'bot'", "use one of system, user, assistant, tool",
          "ShareGPT's from: human, gpt, system")),
    Case("dataset-columns-missing",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "qa.jsonl", [{"question": "q", "answer": "a"}]),
                          "--columns", "prompt=question,completion=reply"),
         ("--columns completion=reply", "qa.jsonl has no field 'reply' (its fields: question, answer)",
          "fix the name in --columns")),
    Case("dataset-dir-mixed-formats", lambda s: _train(s, s.tiny.model, _mixed_dir(s)),
         ("mixes formats", "chat.jsonl is chat", "notes.txt is text", "keep one format per dataset")),
    Case("dataset-unknown-split", lambda s: _train(s, s.tiny.model, _split_dir(s), "--val-split", "dev"),
         ("--val-split dev", "has no split 'dev' (its splits, from its file names: test, train)",
          "pass one of them to --val-split")),
    Case("dataset-config-missing", lambda s: _train(s, s.tiny.model, _hub_style(s)),
         ("has several configs (words, pairs)", "choose one with --dataset-config")),
    Case("dataset-unknown-config", lambda s: _train(s, s.tiny.model, _hub_style(s), "--dataset-config", "nope"),
         ("--dataset-config nope", "has no config 'nope' (its configs: words, pairs)")),
    Case("dataset-hub-offline", lambda s: _train(s, s.tiny.model, "some-org/some-data"),
         ("dataset some-org/some-data is not a local path and could not be loaded from the hub (offline mode",
          "hf download some-org/some-data --repo-type dataset --local-dir ./some-data")),
    Case("val-file-unknown-fields",
         lambda s: _train(s, s.tiny.model, s.data, "--val-file", write_jsonl(s.tmp / "val.jsonl", [{"q": "a"}])),
         ("cannot tell the format of", "val.jsonl from its fields q", "--columns")),
    Case("val-file-malformed-line",
         lambda s: _train(s, s.tiny.model, s.data, "--val-file", _file(s, "val.jsonl", '{"text": "one"}\n{"text"\n')),
         ("val.jsonl line 2: not valid JSON",)),
    Case("template-chat-without-chat-template",
         lambda s: _train(s, s.tiny.model, write_jsonl(s.tmp / "alpaca.jsonl", [{"instruction": "i", "output": "o"}]),
                          "--template", "chat", "--tokenizer", _without_chat_template(s)),
         ("--template chat renders instruction rows with the tokenizer's chat template", "pass --template alpaca")),
    Case("template-not-for-this-format", lambda s: _train(s, s.tiny.model, s.data, "--template", "alpaca"),
         ("--template alpaca is how instruction rows", "is text; drop --template")),
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
    Case("usage-columns-malformed", lambda s: _train(s, s.tiny.model, s.data, "--columns", "prompt:question"),
         ("--columns 'prompt:question': 'prompt:question' is not NAME=COLUMN",), code=2),
    Case("usage-lr-nan", lambda s: _train(s, s.tiny.model, s.data, "--lr", "nan"),
         ("--lr nan must be a finite number",), code=2),
    Case("usage-lr-inf", lambda s: _train(s, s.tiny.model, s.data, "--lr", "inf", "--max-grad-norm", "-inf"),
         ("--lr inf must be a finite number", "--max-grad-norm -inf must be a finite number"), code=2),
]


def _snapshot(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}  # the lock names its holder


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: a write past `limit` fails with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name, marks=case.marks) for case in CASES])
def test_bad_input(case: Case, tiny: Tiny, learnable: Path, interrupted_run, env, tmp_path: Path) -> None:
    output = tmp_path / "out"
    if case.run:
        shutil.copytree(interrupted_run[0], output)
    setup = Setup(tmp_path, tiny, learnable, output)
    args = case.args(setup)
    before = _snapshot(output / case.intact)
    options = {"preexec_fn": _limit_file_size(case.file_size_limit)} if case.file_size_limit else {}

    # A new process where the check needs one (a file size limit, the hub switched off at import); else in this
    # process, which saves each row the seconds of importing torch (the script itself: the subprocess rows).
    in_process = not options and "hub" not in case.name
    result = run_in_process(env, *args) if in_process else run_finetune(env, *args, **options)

    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]  # usage errors too
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    message = errors[0]
    for expected in case.expected:
        assert expected in message, message
    assert _snapshot(output / case.intact) == before
    if not case.run:
        assert output.exists() == case.started and not (output / "checkpoints").exists()
