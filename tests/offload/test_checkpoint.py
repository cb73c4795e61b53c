"""Engine checkpoints: a run stopped after a checkpoint and resumed from it equals one never stopped (torch.equal),
and a checkpoint is complete or absent.

Reference: the same engine trained without interruption. Every chunk goes through the NVMe tier (minimum
budget), with gradient accumulation and exact clipping, so the optimizer state that is saved is the streamed one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload.checksums import write_checksums


def _engine(path, swap, **optimizer_options) -> offload.Engine:
    model = AutoModelForCausalLM.from_pretrained(path)
    adamw = optim.AdamW(lr=1e-2, weight_decay=0.1, **optimizer_options)
    device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=2)
    budget = offload.Budget(device=device, host=host, nvme=swap)
    return offload.Engine(model, adamw, budget, accumulation_steps=2, max_grad_norm=0.5)


def _batches(seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=4, seq=16, generator=generator) for _ in range(steps)]


def _parameters(directory) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(directory).named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resumed_run_equals_uninterrupted_run(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=3)
    batches = _batches(seed=int(torch.randint(0, 2**31, ())), steps=5)

    with _engine(path, tmp_path / "swap-a") as engine:
        uninterrupted = [engine.train_step(b) for b in batches]
        engine.export(tmp_path / "uninterrupted")

    with _engine(path, tmp_path / "swap-b") as engine:
        first = [engine.train_step(b) for b in batches[:2]]
        engine.save_checkpoint(tmp_path / "checkpoint", extra={"data_position": 2, "rng": torch.get_rng_state()})
        engine.train_step(batches[2])  # work after the checkpoint is lost by the "crash"
    with _engine(path, tmp_path / "swap-c") as engine:
        extra = engine.load_checkpoint(tmp_path / "checkpoint")
        assert engine.step_count == 2 and extra["data_position"] == 2
        rest = [engine.train_step(b) for b in batches[extra["data_position"] :]]
        engine.export(tmp_path / "resumed")

    assert first + rest == uninterrupted
    expected, resumed = _parameters(tmp_path / "uninterrupted"), _parameters(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], p) for name, p in expected.items())


def test_checkpoint_is_a_model_directory_with_the_engine_weights(tmp_path):
    path = save_tiny_model("qwen2", tmp_path / "model", seed=4)
    with _engine(path, tmp_path / "swap") as engine:
        engine.train_step(_batches(seed=5, steps=1)[0])
        engine.save_checkpoint(tmp_path / "checkpoint")
        engine.export(tmp_path / "export")
    loaded, exported = _parameters(tmp_path / "checkpoint"), _parameters(tmp_path / "export")
    assert loaded.keys() == exported.keys()
    assert all(torch.equal(loaded[name], p) for name, p in exported.items())


def test_existing_directory_is_refused_and_a_failed_save_leaves_nothing(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=6)
    with _engine(path, tmp_path / "swap") as engine:
        engine.train_step(_batches(seed=7, steps=1)[0])
        engine.save_checkpoint(tmp_path / "first")
        before = sorted(p.name for p in (tmp_path / "first").iterdir())
        with pytest.raises(FileExistsError, match="exists already"):
            engine.save_checkpoint(tmp_path / "first")
        with pytest.raises(ValueError, match="extra"):
            engine.save_checkpoint(tmp_path / "second", extra={"not storable": object()})
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "model"]


def test_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path):
    small = save_tiny_model("llama", tmp_path / "small", seed=8)
    wide = save_tiny_model("llama", tmp_path / "wide", seed=8, intermediate_size=96)
    with _engine(small, tmp_path / "swap-a") as engine:
        engine.save_checkpoint(tmp_path / "checkpoint")
    with _engine(wide, tmp_path / "swap-b") as engine:
        with pytest.raises(ValueError, match="different model"):
            engine.load_checkpoint(tmp_path / "checkpoint")
        with pytest.raises(ValueError, match="not a checkpoint"):
            engine.load_checkpoint(tmp_path / "small")


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=8)
    with _engine(path, tmp_path / "swap-a") as engine:
        engine.save_checkpoint(tmp_path / "checkpoint")
    state_file = tmp_path / "checkpoint" / "engine_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "format": state["format"] + 1}, state_file)
    files = json.loads((tmp_path / "checkpoint" / offload.CHECKSUMS_FILE).read_text())["files"]
    write_checksums(tmp_path / "checkpoint", files)  # as the finetune of that format would have
    with _engine(path, tmp_path / "swap-b") as engine:
        with pytest.raises(ValueError, match=f"has format {state['format'] + 1}, and this version of finetune reads"):
            engine.load_checkpoint(tmp_path / "checkpoint")


def test_a_flipped_byte_in_any_file_is_refused_with_the_file_named(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=9)
    with _engine(path, tmp_path / "swap-a") as engine:
        engine.train_step(_batches(seed=10, steps=1)[0])
        engine.save_checkpoint(tmp_path / "checkpoint", extra={"rng": torch.get_rng_state()})
    files = json.loads((tmp_path / "checkpoint" / offload.CHECKSUMS_FILE).read_text())["files"]
    assert {"model.safetensors", "optimizer.safetensors", "engine_state.pt", "config.json"} <= set(files)
    with _engine(path, tmp_path / "swap-b") as engine:
        for name in [*files, offload.CHECKSUMS_FILE]:
            damaged = tmp_path / f"damaged-{name}"
            shutil.copytree(tmp_path / "checkpoint", damaged)
            data = bytearray((damaged / name).read_bytes())
            data[int(torch.randint(0, len(data), ()))] ^= 1 << int(torch.randint(0, 8, ()))  # any byte, any bit
            (damaged / name).write_bytes(bytes(data))
            with pytest.raises(offload.ChecksumMismatch, match=f"{damaged / name} (does not match|is damaged)"):
                engine.load_checkpoint(damaged)
        assert engine.load_checkpoint(tmp_path / "checkpoint")["rng"].shape == torch.get_rng_state().shape
