"""Engine checkpoints, portable and in swap: a run stopped after a checkpoint and resumed from it equals one never
stopped (torch.equal), a checkpoint is complete or absent, and one in swap copies nothing, keeps its versions
whatever is written after it, and gives them back when dropped.

Reference: the same engine trained without interruption. Every chunk goes through the NVMe tier (minimum
budget), with gradient accumulation and exact clipping, so the optimizer state that is saved is the streamed one.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload.checksums import write_checksums


def _engine(path, swap, **options) -> offload.Engine:
    model = AutoModelForCausalLM.from_pretrained(path)
    adamw = optim.AdamW(lr=1e-2, weight_decay=0.1)
    device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=2)
    budget = offload.Budget(device=device, host=host, nvme=swap)
    return offload.Engine(model, adamw, budget, accumulation_steps=2, max_grad_norm=0.5, **options)


def _versions(engine: offload.Engine) -> set[str]:
    """The swap files in use: current versions and the kept ones (not the spares speculative clipping reuses)."""
    return {p.name for p in engine.swap_directory.iterdir()} - {".lock"} - set(engine.store.spare_versions())


def _chunks(engine: offload.Engine) -> list:
    return [chunk for state in engine.blocks for chunk in state.chunks()]


def _one_file_per_chunk(names: set[str]) -> bool:
    """Whether no chunk has more than one version (its current one): none is kept for a checkpoint."""
    return len({name.rsplit(".", 1)[0] for name in names}) == len(names)


def _referenced(checkpoint) -> list[str]:
    """The swap versions a checkpoint in swap references."""
    refs = torch.load(checkpoint / "engine_state.pt", weights_only=True)["swap"]["chunks"].values()
    return sorted(ref[0] for ref in refs if ref is not None)


def _batches(seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=4, seq=16, generator=generator) for _ in range(steps)]


def _parameters(directory) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(directory).named_parameters())


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "in-swap"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resumed_run_equals_uninterrupted_run(arch, portable, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=3)
    batches = _batches(seed=int(torch.randint(0, 2**31, ())), steps=5)
    checkpoint = tmp_path / "checkpoint"

    with _engine(path, tmp_path / "swap-a") as engine:
        uninterrupted = [engine.train_step(b) for b in batches]
        engine.export(tmp_path / "uninterrupted")

    with _engine(path, tmp_path / "swap", run_name="run") as engine:
        first = [engine.train_step(b) for b in batches[:2]]
        engine.save_checkpoint(checkpoint, extra={"data_position": 2, "rng": torch.get_rng_state()}, portable=portable)
        engine.train_step(batches[2])  # work after the checkpoint is lost by the "crash"
    assert (tmp_path / "swap").exists() is not portable  # a checkpoint in swap keeps its versions after close
    with _engine(path, tmp_path / "swap", run_name="run", checkpoints=[checkpoint]) as engine:
        extra = engine.load_checkpoint(checkpoint)
        assert engine.step_count == 2 and extra["data_position"] == 2
        rest = [engine.train_step(b) for b in batches[extra["data_position"] :]]
        engine.export(tmp_path / "resumed")
        engine.drop_checkpoint(checkpoint)
    assert not (tmp_path / "swap" / "finetune-run").exists()  # nothing of the run is left once no checkpoint needs it

    assert first + rest == uninterrupted
    expected, resumed = _parameters(tmp_path / "uninterrupted"), _parameters(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], p) for name, p in expected.items())


def test_a_checkpoint_in_swap_copies_nothing_and_keeps_its_versions_until_dropped(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=11)
    batches = _batches(seed=int(torch.randint(0, 2**31, ())), steps=4)
    with _engine(path, tmp_path / "swap") as engine:
        engine.train_step(batches[0])
        in_memory = sum(c.nbytes for c in _chunks(engine) if c.dirty is not None)
        written = engine.stats()["bytes_written"]
        engine.save_checkpoint(tmp_path / "a")
        assert engine.stats()["bytes_written"] - written == in_memory  # only what was not in a swap file yet
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checksums.json", "engine_state.pt"]
        kept = {name: offload.checksum_file(engine.swap_directory / name) for name in _referenced(tmp_path / "a")}

        engine.train_step(batches[1])  # every chunk changes: written to new versions, the kept ones untouched
        engine.save_checkpoint(tmp_path / "b")
        engine.train_step(batches[2])
        assert {name: offload.checksum_file(engine.swap_directory / name) for name in kept} == kept
        engine.drop_checkpoint(tmp_path / "a")
        assert not (tmp_path / "a").exists() and not kept.keys() & _versions(engine)  # given back
        in_use = {chunk.key.replace("/", ".") for chunk in _chunks(engine) if chunk.on_nvme}
        assert {name.rsplit(".", 1)[0] for name in _versions(engine)} >= in_use
        engine.drop_checkpoint(tmp_path / "b")  # every version left is a chunk's current one: one each
        assert _one_file_per_chunk(_versions(engine))


def test_a_damaged_or_missing_swap_version_is_refused_with_the_file_and_chunk_named(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=12)
    with _engine(path, tmp_path / "swap", run_name="run") as engine:
        engine.train_step(_batches(seed=13, steps=1)[0])
        engine.save_checkpoint(tmp_path / "checkpoint")
    versions = _referenced(tmp_path / "checkpoint")
    assert versions and set(versions) == set(os.listdir(tmp_path / "swap" / "finetune-run")) - {".lock"}
    victim = tmp_path / "swap" / "finetune-run" / versions[int(torch.randint(0, len(versions), ()))]
    data = bytearray(victim.read_bytes())
    data[int(torch.randint(0, len(data), ()))] ^= 1 << int(torch.randint(0, 8, ()))
    victim.write_bytes(bytes(data))
    with _engine(path, tmp_path / "swap", run_name="run", checkpoints=[tmp_path / "checkpoint"]) as engine:
        with pytest.raises(offload.ChecksumMismatch, match=f"{victim} \\(chunk [^)]+\\) does not match the checksum"):
            engine.load_checkpoint(tmp_path / "checkpoint")
    with _engine(path, tmp_path / "swap", run_name="run") as engine:  # not told to keep it: cleared at start
        assert engine.swap_reclaimed > 0
        with pytest.raises(offload.ChecksumMismatch, match="is gone"):
            engine.load_checkpoint(tmp_path / "checkpoint")
    with _engine(path, tmp_path / "other", run_name="run") as engine:
        with pytest.raises(ValueError, match="keeps its state in the swap files of"):
            engine.load_checkpoint(tmp_path / "checkpoint")


def test_checkpoint_is_a_model_directory_with_the_engine_weights(tmp_path):
    path = save_tiny_model("qwen2", tmp_path / "model", seed=4)
    with _engine(path, tmp_path / "swap") as engine:
        engine.train_step(_batches(seed=5, steps=1)[0])
        engine.save_checkpoint(tmp_path / "checkpoint", portable=True)
        engine.export(tmp_path / "export")
    loaded, exported = _parameters(tmp_path / "checkpoint"), _parameters(tmp_path / "export")
    assert loaded.keys() == exported.keys()
    assert all(torch.equal(loaded[name], p) for name, p in exported.items())


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "in-swap"])
def test_existing_directory_is_refused_and_a_failed_save_leaves_nothing(portable, tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=6)
    with _engine(path, tmp_path / "swap") as engine:
        engine.train_step(_batches(seed=7, steps=1)[0])
        engine.save_checkpoint(tmp_path / "first", portable=portable)
        before = sorted(p.name for p in (tmp_path / "first").iterdir())
        with pytest.raises(FileExistsError, match="exists already"):
            engine.save_checkpoint(tmp_path / "first", portable=portable)
        with pytest.raises(ValueError, match="extra"):
            engine.save_checkpoint(tmp_path / "second", extra={"not storable": object()}, portable=portable)
        assert sorted(p.name for p in (tmp_path / "first").iterdir()) == before
        engine.train_step(_batches(seed=8, steps=1)[0])
        engine.drop_checkpoint(tmp_path / "first")
        assert _one_file_per_chunk(_versions(engine))  # no failed save kept a reference to the old versions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path):
    small = save_tiny_model("llama", tmp_path / "small", seed=8)
    wide = save_tiny_model("llama", tmp_path / "wide", seed=8, intermediate_size=96)
    with _engine(small, tmp_path / "swap-a") as engine:
        engine.save_checkpoint(tmp_path / "checkpoint", portable=True)
    with _engine(wide, tmp_path / "swap-b") as engine:
        with pytest.raises(ValueError, match="different model"):
            engine.load_checkpoint(tmp_path / "checkpoint")
        with pytest.raises(ValueError, match="not a checkpoint"):
            engine.load_checkpoint(tmp_path / "small")


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model", seed=8)
    with _engine(path, tmp_path / "swap-a") as engine:
        engine.save_checkpoint(tmp_path / "checkpoint", portable=True)
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
        engine.save_checkpoint(tmp_path / "checkpoint", extra={"rng": torch.get_rng_state()}, portable=True)
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
