"""A byte flipped in any file a resume reads is refused with that file named, before it is parsed, and the
checkpoint before it is offered (cli/checkpoints.py, offload/checksums.py). Each kind of file: chunk data (the
weights and the optimizer state), the engine state with the RNG, the manifest, the run config, the tokenizer,
and the checksum record itself; and for a checkpoint in swap, the swap versions it references."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_support import assert_same_run, interrupt_at, run_finetune, summary
from typer.testing import CliRunner

from finetune.cli.main import app

pytestmark = pytest.mark.integration
runner = CliRunner()

# (file relative to the latest checkpoint, or to checkpoints/ for the manifest; where to flip: "end" is the last
# byte, inside the data of a safetensors file or the RNG state's tensor bytes; "middle" is inside a text file)
FILES = [
    ("model.safetensors", "end"),
    ("optimizer.safetensors", "end"),
    ("engine_state.pt", "middle"),
    ("checksums.json", "middle"),
    ("run-config.yaml", "middle"),
    ("tokenizer.json", "middle"),
    ("../manifest.json", "middle"),
]


def _flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) - 1 if where == "end" else len(data) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(("name", "where"), FILES, ids=[name.removeprefix("../") for name, _ in FILES])
def test_flipped_byte_is_refused_with_the_file_named(name: str, where: str, interrupted_run, env,
                                                     tmp_path: Path) -> None:
    output = tmp_path / "run"
    shutil.copytree(interrupted_run[0], output)
    entries = json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    latest = output / "checkpoints" / entries[-1]["name"]
    damaged = (latest / name).resolve()
    _flip(damaged, where)
    before = _digests(output)

    result = runner.invoke(app, ["run", "--resume", "--output", str(output)], env=env)  # in process: no imports

    assert result.exit_code == 1, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert str(damaged.name) in errors[0] and "damaged" in errors[0], errors[0]
    if name != "../manifest.json" and len(entries) > 1:  # the one before it is offered
        assert f"finetune run --resume-from {entries[-2]['name']} --output {output}" in errors[0], errors[0]
    assert _digests(output) == before  # refused before anything was written


def test_resume_from_the_checkpoint_before_a_damaged_one_ends_as_the_reference(interrupted_run, reference_run, env,
                                                                              tmp_path: Path) -> None:
    output = tmp_path / "run"
    shutil.copytree(interrupted_run[0], output)
    entries = json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert len(entries) >= 2
    _flip(output / "checkpoints" / entries[-1]["name"] / "optimizer.safetensors", "end")
    refused = run_finetune(env, "run", "--resume", "--output", output)
    advice = f"finetune run --resume-from {entries[-2]['name']} --output {output}"
    assert refused.returncode == 1 and advice in refused.stderr, refused.stderr

    resumed = run_finetune(env, *advice.split()[1:], "--json")

    assert summary(resumed)["step"] == 24
    assert f"going back to {entries[-2]['name']}: removed the later checkpoint(s) {entries[-1]['name']}" in \
        resumed.stderr
    assert_same_run(output, reference_run[0])


def test_a_flipped_byte_in_a_swap_version_is_refused_and_the_one_before_resumes(run_args, reference_run, env,
                                                                                 tmp_path: Path) -> None:
    """A checkpoint in swap (not copied: it lives with its run's swap files): a byte flipped in chunk data, one
    of the swap versions it references, is refused with the file and chunk named; the checkpoint before it
    resumes to the reference's end (the later one and its versions dropped)."""
    output = tmp_path / "run"
    stopped = interrupt_at(env, run_args(output), output, 10, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    entries = json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert len(entries) >= 2 and all(entry["swap"] for entry in entries)
    latest = output / "checkpoints" / entries[-1]["name"]
    exported = runner.invoke(app, ["export", str(output), str(tmp_path / "out")], env=env)  # not a model: refused
    assert exported.exit_code == 1 and "keeps its state in the run's swap files" in exported.stderr, exported.stderr
    assert "--portable-checkpoints" in exported.stderr and not (tmp_path / "out").exists()
    shutil.copytree(output, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock"))  # its swap files stay behind
    copied = runner.invoke(app, ["run", "--resume", "--output", str(tmp_path / "copy")], env=env)
    assert copied.exit_code == 1 and "belong to the run at the --output it was started with" in copied.stderr, \
        copied.stderr
    refs = torch.load(latest / "engine_state.pt", weights_only=True)["swap"]["chunks"]
    key, (name, _) = next((key, ref) for key, ref in sorted(refs.items()) if ref is not None and "exp_avg" in key)
    _flip(Path(entries[-1]["swap"]) / name, "end")

    refused = run_finetune(env, "run", "--resume", "--output", output)
    advice = f"finetune run --resume-from {entries[-2]['name']} --output {output}"
    assert refused.returncode == 1, refused.stderr
    assert f"{name} (chunk {key}) does not match the checksum" in refused.stderr and advice in refused.stderr, \
        refused.stderr

    resumed = run_finetune(env, *advice.split()[1:], "--json")
    assert summary(resumed)["step"] == 24
    assert_same_run(output, reference_run[0])
    assert not any(Path(entries[-1]["swap"]).parent.iterdir())  # the finished run left nothing in --nvme
