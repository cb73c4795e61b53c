"""benchmarks/synthetic_model.py: the directories it writes are what transformers and the engine load.

Reference: transformers itself. `from_pretrained` must report no missing, unexpected or mismatched keys and keep
the stored bf16 bytes; `Engine.from_pretrained` must load the same model and give the same first loss as the
model loaded in memory in fp32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import random_batch
from transformers import AutoModelForCausalLM

from finetune import offload, optim

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/*.py are scripts, not a package

import synthetic_model  # noqa: E402
from synthetic_model import NotEnoughDisk, llama_tiny, main, write_synthetic_model  # noqa: E402


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the directory's safetensors files, by name."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_loads_it_with_every_key_in_bf16(tmp_path, tie):
    config = llama_tiny()
    config.tie_word_embeddings = tie
    directory = write_synthetic_model(config, tmp_path / "model", log=None)

    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not any(tmp_path.glob(".*"))  # the .partial directory was renamed
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not info["mismatched_keys"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    stored = _tensors(directory)
    assert ("lm_head.weight" in stored) is not tie  # a tied head is saved once, under the embedding
    for name, param in model.state_dict().items():
        assert torch.equal(param, stored["model.embed_tokens.weight" if tie and name == "lm_head.weight" else name])
    for name, tensor in stored.items():
        if tensor.dim() == 1:
            assert torch.equal(tensor, torch.ones_like(tensor)), name  # norm scales
    embedding = stored["model.embed_tokens.weight"].float()  # 256 x 64 draws
    assert abs(embedding.mean().item()) < 1e-3
    torch.testing.assert_close(embedding.std().item(), config.initializer_range, rtol=0.03, atol=0)


def test_small_shards_write_an_index_that_transformers_loads(tmp_path):
    directory = write_synthetic_model(llama_tiny(), tmp_path / "model", max_shard_bytes=40_000, log=None)

    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    stored = _tensors(directory)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert set(index["weight_map"]) == set(stored)
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    # the same seed in one file gives the same tensors: shard size does not change the draws
    single = _tensors(write_synthetic_model(llama_tiny(), tmp_path / "single", log=None))
    assert all(torch.equal(single[name], tensor) for name, tensor in stored.items())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_model, "SLICE_ELEMENTS", 1000)  # several slices per matrix, out of order
    config = llama_tiny()
    first = write_synthetic_model(config, tmp_path / "a", seed=3, threads=1, log=None)
    again = write_synthetic_model(config, tmp_path / "b", seed=3, threads=4, log=None)
    other = write_synthetic_model(config, tmp_path / "c", seed=4, log=None)

    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()
    a, c = _tensors(first), _tensors(other)
    assert not any(torch.equal(a[name], c[name]) for name in a if a[name].dim() > 1)
    assert (first / "config.json").read_text() == (other / "config.json").read_text()


def test_the_engine_loads_it_and_trains_a_step(tmp_path):
    config = llama_tiny()
    directory = write_synthetic_model(config, tmp_path / "model", log=None)
    batch = random_batch(config.vocab_size, generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(**batch, use_cache=False).loss.item()

    budget = offload.Budget(nvme=tmp_path / "swap")
    with offload.Engine.from_pretrained(directory, optim.AdamW(lr=1e-3), budget=budget) as engine:
        first = engine.train_step(batch)
        second = engine.train_step(batch)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)  # loss before the update
    assert second < first


def test_refuses_a_full_disk_and_a_used_directory_leaving_nothing(tmp_path, monkeypatch):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_synthetic_model(llama_tiny(), tmp_path / "used", log=None)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synthetic_model.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1234, 1234))
    with pytest.raises(NotEnoughDisk, match=r"needs \d+ bytes .* 1234 bytes .* are free"):
        write_synthetic_model(llama_tiny(), tmp_path / "model", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_an_interrupted_write_leaves_no_directory(tmp_path, monkeypatch):
    calls = []

    def failing(out: torch.Tensor, std: float, seed: int) -> None:
        calls.append(seed)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        out.zero_()

    monkeypatch.setattr(synthetic_model, "_fill_normal", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic_model(llama_tiny(), tmp_path / "model", max_shard_bytes=40_000, log=None)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_parameters_shards_and_json(tmp_path, capsys):
    assert main(["llama-tiny", str(tmp_path / "model"), "--layers", "3", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    assert summary["layers"] == 3 and summary["seed"] == 1
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "model").iterdir())
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 3
    assert any(line.startswith("shard 1/1:") for line in lines)
    assert main(["llama-tiny", str(tmp_path / "model")]) == 1  # exists: one line on stderr, no traceback
    assert capsys.readouterr().err.count("\n") == 1


def test_peak_rss_while_writing_stays_far_below_the_model(tmp_path):
    """A 424 MiB model (16 layers of hidden 1024) in 64 MiB shards, written by 2 threads in a fresh process: its
    peak RSS (VmHWM) may rise 150 MiB above the RSS before the call, about a third of the model, so holding the
    model fails (measured: +486 MiB when every slice was kept). What it holds: 4 slices of 8 MiB in flight and a
    16 MiB fp32 scratch slice per thread, about 64 MiB (measured +62 MiB)."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from common import max_rss_rusage, rss
        from synthetic_model import llama_tiny, write_synthetic_model
        from transformers import LlamaConfig
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, vocab_size=8192,
                             num_attention_heads=16, num_key_value_heads=16)
        write_synthetic_model(llama_tiny(), Path(sys.argv[1]) / "warm-up", log=None)  # imports, first allocations
        before = rss()
        out = write_synthetic_model(config, Path(sys.argv[1]) / "model", max_shard_bytes=64 << 20, threads=2,
                                   log=None)
        model = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        print(json.dumps({{"before": before, "peak": max_rss_rusage(), "model": model}}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.splitlines()[-1])
    mib = 1 << 20
    assert measured["model"] > 400 * mib
    assert measured["peak"] - measured["before"] < 150 * mib, measured
