"""`finetune run --lora / --qlora` and `finetune export` of adapters, end to end on the tiny Llama.

References: for the exported adapter, the engine's own logits from the same checkpoint (<= 1e-5); for the merged
export, `PeftModel.from_pretrained(base, adapter)` (<= 1e-5); for resume, the same LoRA run never stopped
(adapters and optimizer state torch.equal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_support import Tiny, counting, run_finetune, summary
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli.main import app
from finetune.offload import checksum_json

pytestmark = pytest.mark.integration

peft = pytest.importorskip("peft")

runner = CliRunner()
LORA_ARGS = ["--lora", "--lora-rank", "4", "--steps", "12", "--batch-size", "4", "--seq-len", "24", "--lr", "2e-2",
             "--val-fraction", "0.1", "--eval-every", "4", "--checkpoint-every", "4", "--keep-checkpoints", "3"]
"""Dropout stays at its default (0.05), so resume must also replay the dropout masks."""
FINAL = "checkpoints/step-00000012"


def _lora_run(tiny: Tiny, data: Path, output: Path, env: dict[str, str], *extra: str) -> dict:
    swap = output.parent / f"{output.name}-swap"
    return summary(run_finetune(env, "run", tiny.model, data, "--output", output, *LORA_ARGS, *tiny.budget_flags(swap),
                                *extra, "--json"))


def _eval_losses(output: Path) -> list[float]:
    records = map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    return [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def lora_run(tiny: Tiny, learnable: Path, env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("lora") / "run"  # copied by tests: its checkpoints must stand alone
    return output, _lora_run(tiny, learnable, output, env, "--portable-checkpoints", "--merge-at-end")


def test_lora_run_trains_adapters_and_checkpoints_only_them(lora_run) -> None:
    output, result = lora_run
    assert result["status"] == "completed" and result["step"] == 12
    evals = _eval_losses(output)
    assert len(evals) == 4 and evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 0.2, evals  # 0, 4, 8, 12
    files = {p.name for p in (output / FINAL).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "engine_state.pt", "run-config.yaml",
            "tokenizer.json"} <= files
    assert not {"config.json", "model.safetensors"} & files  # the base is not copied
    saved = yaml.safe_load((output / "run-config.yaml").read_text())
    assert (saved["lora"], saved["lora_rank"], saved["lora_alpha"], saved["lora_dropout"]) == (True, 4, 8.0, 0.05)
    assert result["export"].endswith("ADAPTER_DIR") and result["export_merged"].endswith("--merge")


def _batch(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return dict(tokenizer([counting(3, 10), counting(7, 14)], return_tensors="pt", padding=True))


def _engine_logits(tiny: Tiny, checkpoint: Path, batch: dict[str, torch.Tensor], swap: Path) -> torch.Tensor:
    """The logits of the engine that trained the run, restored from `checkpoint` (LoRA as `finetune run` builds it)."""
    from finetune import offload, optim
    from finetune.cli.lora import wrap_lora
    from finetune.cli.model import build_meta_model

    model = wrap_lora(build_meta_model(tiny.model), rank=4, alpha=8.0, dropout=0.05, targets="all-linear", seed=0,
                      base_name=str(tiny.model))
    budget = offload.Budget(device=tiny.device_bytes, host=tiny.host_bytes, nvme=swap)
    with offload.Engine(model, optim.AdamW(), budget, weights=tiny.model, device="cpu") as engine, torch.no_grad():
        engine.load_checkpoint(checkpoint)
        engine.model.eval()  # no dropout
        return engine.model(**batch).logits


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asking transformers 5
def test_export_adapter_and_merged_model_match_the_engine(lora_run, tiny: Tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    output, _ = lora_run
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    result = runner.invoke(app, ["export", str(output), str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["kind"] == "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert not any("optimizer" in p.name or p.suffix in (".pt", ".yaml") for p in adapter.iterdir())
    result = runner.invoke(app, ["export", str(output), str(merged), "--merge", "--json"])  # base from run-config.yaml
    assert result.exit_code == 0, result.output
    assert not (merged / "adapter_config.json").exists() and (merged / "tokenizer.json").exists()
    for name in ("model.safetensors", "config.json"):  # --merge-at-end wrote the same into OUTPUT/final/
        assert (output / "final" / name).read_bytes() == (merged / name).read_bytes(), name
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == tiny.model.resolve()  # loadable from anywhere

    batch = _batch(adapter)
    expected = _engine_logits(tiny, output / FINAL, batch, tmp_path / "swap")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny.model)
        with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()(**batch).logits
        from_merged = AutoModelForCausalLM.from_pretrained(merged)(**batch).logits
    assert (with_adapter - AutoModelForCausalLM.from_pretrained(tiny.model)(**batch).logits).abs().max() > 1e-3
    torch.testing.assert_close(with_adapter, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_merged, with_adapter, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_generate_puts_the_adapter_on_the_streamed_base(lora_run, tiny: Tiny, env) -> None:
    """`generate` on the run's last checkpoint (the adapter) and on the run (its final/, merged by --merge-at-end)
    equals model.generate in memory: PeftModel on the base, and the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    ids = tokenizer("four five six", return_tensors="pt").input_ids
    budget = ["--device-memory", str(tiny.device_bytes + (1 << 20)), "--host-memory", str(tiny.host_bytes)]
    with torch.no_grad():
        with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.model), output / FINAL)
        merged = AutoModelForCausalLM.from_pretrained(output / "final")
    for source, model in ((output / FINAL, with_adapter), (output, merged)):
        result = run_finetune(env, "generate", source, "--prompt", "four five six", "--max-new-tokens", "8", *budget,
                              "--json")
        assert result.returncode == 0, result.stderr
        want = model.eval().generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        generated = json.loads(result.stdout)
        assert generated["token_ids"] == want, source
        assert (generated["adapter"] is None) == (source == output)  # the merged final/ needs no adapter


@pytest.mark.parametrize(("args", "message"), [
    (lambda out, tiny: [out, "--merge", "--base", tiny.model.parent / "missing"], "--base"),
    (lambda out, tiny: [out / FINAL, "--merge", "--dtype", "bfloat16"], None),  # a checkpoint: run-config.yaml there
    (lambda out, tiny: [tiny.model, "--merge"], "holds a whole model, not a LoRA adapter"),
], ids=["base-missing", "checkpoint-base-from-its-run-config", "merge-of-a-whole-model"])
def test_export_merge_base_and_errors(args, message: str | None, lora_run, tiny: Tiny, tmp_path: Path) -> None:
    source, *options = args(lora_run[0], tiny)
    result = runner.invoke(app, ["export", str(source), str(tmp_path / "out"), *map(str, options)])
    if message is None:
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
        return
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_export_merge_without_a_known_base_names_base(lora_run, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(lora_run[0] / FINAL, bare)
    (bare / "run-config.yaml").unlink()
    result = runner.invoke(app, ["export", str(bare), str(tmp_path / "out"), "--merge"])
    assert result.exit_code == 1 and "--base PATH" in result.output, result.output


def _stopped_at_step_8(reference: Path, output: Path) -> Path:
    """A copy of the reference run as if it had stopped after step 8: its later checkpoint dropped."""
    shutil.copytree(reference, output)
    manifest = output / "checkpoints" / "manifest.json"
    entries = json.loads(manifest.read_text())["checkpoints"]
    kept = [e for e in entries if e["step"] <= 8]
    manifest.write_text(json.dumps({"checkpoints": kept, "checksum": checksum_json(kept)}))
    shutil.rmtree(output / FINAL)
    return output


def test_resumed_lora_run_ends_with_the_same_adapters(lora_run, env, tmp_path: Path) -> None:
    """Resume from the step-8 checkpoint of the reference run: the final adapters and optimizer state are equal
    to the reference's, bit for bit."""
    reference, _ = lora_run
    output = _stopped_at_step_8(reference, tmp_path / "run")
    result = summary(run_finetune(env, "run", "--resume", "--output", output, "--json"))
    assert result["step"] == 12
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        mine, theirs = load_file(output / FINAL / file), load_file(reference / FINAL / file)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine), file
    assert _eval_losses(output) == _eval_losses(reference)


def test_resume_on_another_base_is_refused(lora_run, tiny: Tiny, env, tmp_path: Path) -> None:
    """Same architecture, other weights: only the checkpoint's base fingerprint tells them apart."""
    from cli_support import example_module
    from transformers import AutoTokenizer

    other = tmp_path / "other-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    example_module().save_tiny_llama(other, tokenizer, hidden=32, layers=2, seed=1)
    tokenizer.save_pretrained(other)
    output = _stopped_at_step_8(lora_run[0], tmp_path / "run")
    result = run_finetune(env, "run", other, "--resume", "--output", output)
    assert result.returncode == 1 and "is not the one the adapters in" in result.stderr, result.stderr
    assert not (output / FINAL).exists()


def test_qlora_run_trains(tiny: Tiny, learnable: Path, env, tmp_path: Path) -> None:
    output = tmp_path / "run"
    result = _lora_run(tiny, learnable, output, env, "--qlora", "--checkpoint-every", "0")
    assert result["status"] == "completed"
    evals = _eval_losses(output)
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 0.2, evals
    assert yaml.safe_load((output / "run-config.yaml").read_text())["qlora"] is True
    assert (output / FINAL / "adapter_model.safetensors").exists()
    generated = run_finetune(env, "generate", output, "--prompt", "one two", "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr  # the adapter of final/ on the base stored as NF4
    assert json.loads(generated.stdout)["adapter"] == str(output / "final")


def test_targets_are_checked_against_the_model(tiny: Tiny) -> None:
    from finetune.cli.errors import FinetuneError
    from finetune.cli.lora import resolve_targets
    from finetune.cli.model import build_meta_model

    model = build_meta_model(tiny.model)
    assert resolve_targets(model, "all-linear") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                    "v_proj"]  # no lm_head
    assert resolve_targets(model, " q_proj, v_proj ,") == ["q_proj", "v_proj"]
    for targets in ("layers", "lm_head", "model.norm"):
        with pytest.raises(FinetuneError, match=f"--lora-targets '{targets}' matches modules that are not linear"):
            resolve_targets(model, targets)
