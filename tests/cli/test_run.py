"""End to end through the installed `finetune` script, as a user runs it: every dataset format, a learnable
run whose eval loss must fall, exact resume after SIGKILL and after Ctrl-C, and the export round trip.

Reference for resume: the same run never stopped (`reference_run`). Final weights and optimizer state must be
equal to 1e-6 (in practice bit-identical), and so must every logged loss. Reference for export: the engine's own
logits from the same checkpoint, to 1e-5.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_support import Tiny, assert_same_run, counting, interrupt_at, run_finetune, summary
from safetensors.torch import load_file

from finetune.cli.run_lock import swap_name

pytestmark = pytest.mark.integration


def _text_dir(directory: Path) -> Path:
    directory.mkdir()
    for part in range(2):
        (directory / f"part{part}.txt").write_text("\n".join(counting(i + part, 12) for i in range(20)) + "\n\n")
    return directory


def _prompt_completion_csv(directory: Path) -> Path:
    lines = ["prompt,completion"] + [f"{counting(i, 5)},{' ' + counting(i + 5, 5)}" for i in range(30)]
    (directory / "pairs.csv").write_text("\n".join(lines) + "\n")
    return directory / "pairs.csv"


def _instruction_parquet(directory: Path) -> Path:
    rows = [{"instruction": "count on", "input": counting(i, 3), "output": counting(i + 3, 5)} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), directory / "instructions.parquet")
    return directory / "instructions.parquet"


def _chat_json(directory: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": counting(i, 4)},
                          {"role": "assistant", "content": counting(i + 4, 4)},
                          {"role": "user", "content": "more"},
                          {"role": "assistant", "content": counting(i + 8, 4)}]} for i in range(30)]
    (directory / "chats.json").write_text(json.dumps(rows))
    return directory / "chats.json"


@pytest.mark.parametrize(
    ("make", "expected", "extra"),
    [
        (_text_dir, "text", ["--pack"]),
        (_prompt_completion_csv, "prompt-completion", []),
        (_instruction_parquet, "instruction", []),
        (_chat_json, "chat", []),
    ],
    ids=["text-txt-dir-packed", "prompt-completion-csv", "instruction-parquet", "chat-json"],
)
def test_each_format_trains_end_to_end(make, expected, extra, tiny: Tiny, env, tmp_path: Path) -> None:
    data = make(tmp_path / "data") if make is _text_dir else make(tmp_path)
    output = tmp_path / "run"
    args = ["run", tiny.model, data, "--output", output, "--steps", "3", "--batch-size", "2", "--seq-len", "96",
            "--lr", "1e-3", "--checkpoint-every", "0", "--json", *extra]
    result = summary(run_finetune(env, *args))
    assert result["status"] == "completed" and result["format"] == expected
    assert result["step"] == 3 and torch.isfinite(torch.tensor(result["train_loss"]))
    assert not {"eval_loss", "eval_perplexity"} & result.keys()  # no validation set: no eval rows
    assert result["wall_seconds"] > result["train_seconds"] > 0  # the wall time holds checkpoints, the final model
    assert result["train_seconds"] == pytest.approx(3 * result["step_seconds"])
    assert (output / "loss.png").stat().st_size > 0 and (output / "run-config.yaml").exists()
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"][-1]["step"] == 3


def test_eval_loss_decreases_and_state_streams_through_nvme(reference_run) -> None:
    output, result = reference_run
    evals = [r["eval_loss"] for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert len(evals) == 4  # steps 0, 8, 16, 24
    assert evals == sorted(evals, reverse=True) and evals[-1] < 0.6 * evals[0], evals
    assert result["nvme_read"] > 0 and result["nvme_written"] > 0  # the budget is below the state: it streamed
    entries = json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    names = [e["name"] for e in entries]
    assert names == ["step-00000024"]  # the earlier ones (--keep-checkpoints 3) were in swap: only for resuming
    assert entries[-1]["swap"] is None  # the last stands alone
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["manifest.json", *names]


def test_a_finished_run_holds_its_final_model(reference_run) -> None:
    """OUTPUT/final/: a Hugging Face model in the model's own dtype (fp32 here) with its tokenizer, equal to the
    last checkpoint's weights; no training state in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, result = reference_run
    final = output / "final"
    assert result["final"] == str(final)
    assert not any(p.name.startswith("optimizer") or p.suffix in (".pt", ".yaml") for p in final.iterdir())
    AutoTokenizer.from_pretrained(final)
    model = dict(AutoModelForCausalLM.from_pretrained(final).named_parameters())
    checkpoint = dict(AutoModelForCausalLM.from_pretrained(output / "checkpoints" / "step-00000024").named_parameters())
    assert model.keys() == checkpoint.keys()
    assert all(torch.equal(model[name], checkpoint[name]) for name in model)


def test_resume_after_sigkill_equals_uninterrupted_run(run_args, reference_run, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    killed = interrupt_at(env, run_args(output), output, 10, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((output / "checkpoints" / "manifest.json").read_text())
    assert 8 <= manifest["checkpoints"][-1]["step"] < 24  # stopped mid-way, after a checkpoint
    swap = output.parent / f"{output.name}-swap"  # run_args's --nvme
    area = swap / f"finetune-{swap_name(output)}"
    assert sum(path.stat().st_size for path in area.iterdir()) > 0  # what the killed process left
    resumed = run_finetune(env, "run", "--resume", "--output", output, "--json")
    result = summary(resumed)
    assert result["status"] == "completed" and result["step"] == 24
    assert_same_run(output, reference_run[0])
    assert f"of swap files that a stopped process of this run left in {area}" in resumed.stderr
    assert list(swap.iterdir()) == []  # nothing of the killed process is left


def test_resume_after_ctrl_c_equals_uninterrupted_run(interrupted_run, reference_run, env, tmp_path: Path) -> None:
    original, stopped = interrupted_run
    assert stopped.returncode == 130, stopped.stderr
    assert f"finetune run --resume --output {original}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    output = tmp_path / "run"
    shutil.copytree(original, output)
    step = json.loads((output / "checkpoints" / "manifest.json").read_text())["checkpoints"][-1]["step"]
    assert 6 <= step < 24  # saved at the step it stopped after
    result = summary(run_finetune(env, "run", "--resume", "--output", output, "--json"))
    assert result["step"] == 24
    assert_same_run(output, reference_run[0])


def test_export_round_trip_matches_engine_logits(reference_run, tiny: Tiny, env, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import offload, optim

    output, _ = reference_run
    exported = tmp_path / "exported"
    result = run_finetune(env, "export", output, exported, "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in exported.iterdir() if "optimizer" in p.name or p.suffix == ".pt") == []
    tokenizer = AutoTokenizer.from_pretrained(exported)
    batch = tokenizer([counting(3, 10), counting(7, 14)], return_tensors="pt", padding=True)
    budget = offload.Budget(device=tiny.device_bytes, host=tiny.host_bytes, nvme=tmp_path / "swap")
    with offload.Engine.from_pretrained(tiny.model, optim.AdamW(), budget) as engine, torch.no_grad():
        engine.load_checkpoint(output / "checkpoints" / "step-00000024")
        expected = engine.model(**batch).logits
    actual = AutoModelForCausalLM.from_pretrained(exported)(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "galore", "frugal", "mezo"])
def test_each_optimizer_trains_through_nvme(optimizer, tiny: Tiny, env, tmp_path: Path) -> None:
    data = _prompt_completion_csv(tmp_path)
    output = tmp_path / "run"
    args = ["run", tiny.model, data, "--output", output, "--steps", "3", "--batch-size", "2", "--seq-len", "64",
            "--lr", "1e-3", "--optimizer", optimizer, "--checkpoint-every", "0", "--json",
            # twice the AdamW host minimum: GaLore's projectors outweigh Adam's moments on matrices this small
            "--device-memory", str(tiny.device_bytes), "--host-memory", str(2 * tiny.host_bytes),
            "--nvme", tmp_path / "swap"]
    result = summary(run_finetune(env, *args))
    assert result["status"] == "completed" and result["step"] == 3
    assert torch.isfinite(torch.tensor(result["train_loss"]))


def test_mezo_with_bf16_storage_trains(tiny: Tiny, env, tmp_path: Path) -> None:
    """--storage-dtype bf16 reaches the engine: the checkpoint holds fp32 tensors of bf16 values. (This 2-layer
    model's bf16 state fits in its minimum budget; tests/offload/test_zeroth_order.py streams one through NVMe.)"""
    data = _prompt_completion_csv(tmp_path)
    output = tmp_path / "run"
    args = ["run", tiny.model, data, "--output", output, "--steps", "3", "--batch-size", "2", "--seq-len", "64",
            "--lr", "1e-3", "--optimizer", "mezo", "--storage-dtype", "bf16", "--checkpoint-every", "0", "--json",
            "--device-memory", str(tiny.device_bytes), "--host-memory", str(tiny.host_bytes),
            "--nvme", tmp_path / "swap"]
    result = summary(run_finetune(env, *args))
    assert result["status"] == "completed" and result["step"] == 3
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    weights = load_file(output / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.equal(w, w.to(torch.bfloat16).float()) for w in weights.values())


def test_a_step_with_gradients_not_finite_is_skipped_and_the_run_goes_on(run_args, env, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact clipping (the default --max-grad-norm 1.0) finds step 2's gradient norm not finite: the engine rolls the
    step back, the run says so once and finishes (in process, so the norm can be made infinite)."""
    from cli_support import run_in_process

    from finetune.offload.clipping import Clipping

    norms = Clipping.global_norm
    calls = []

    def global_norm(self, blocks):
        calls.append(None)
        return torch.tensor(float("inf")) if len(calls) == 2 else norms(self, blocks)

    monkeypatch.setattr(Clipping, "global_norm", global_norm)
    output = tmp_path / "run"
    result = run_in_process(env, *run_args(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped: its gradient norm is not finite") + \
        result.stderr.count("skipped: its gradient norm is not finite") == 1
    assert "skipped steps" in result.stdout  # the summary's row
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in records if "loss" in r][1] == float("inf")
