"""Fixtures for the CLI tests: a tiny Llama with a locally trained tokenizer, learnable data, and the reference
run the resume tests stop and continue.

Nothing is downloaded. The hub is switched off (HF_HUB_OFFLINE), and the `datasets` cache lives in a temporary
directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_support import (
    RUN_ARGS,
    WORDS,
    Tiny,
    counting,
    example_module,
    interrupt_at,
    run_finetune,
    summary,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from finetune import offload, optim
    from finetune.cli.model import build_meta_model

    example = example_module()
    directory = tmp_path_factory.mktemp("tiny") / "model"
    texts = [counting(i, 24) for i in range(len(WORDS))] + [
        "### Instruction:\n### Input:\n### Response:\n<|user|>\n<|assistant|>\n"]
    tokenizer = example.train_tokenizer(texts, directory, vocab_size=300)
    example.save_tiny_llama(directory, tokenizer, hidden=32, layers=2)
    # The largest minimum of the optimizers the tests run (MeZO holds the embedding and head beside a layer).
    minimums = [offload.Engine.minimum_budget(build_meta_model(directory), optimizer)
                for optimizer in (optim.AdamW(), optim.MeZO(), optim.MeZO(storage_dtype=torch.bfloat16))]
    device_bytes, host_bytes = (max(tier) for tier in zip(*minimums))
    return Tiny(directory, device_bytes, host_bytes)


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every `finetune` subprocess: offline, with its caches in a temporary directory."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = tmp_path_factory.mktemp("finetune-cache")  # run's plan line measures rates into it (once per --nvme)
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "COLUMNS": "200", "FINETUNE_CACHE_DIR": str(cache)}


@pytest.fixture(scope="session")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain-text counting sequences as jsonl: the eval loss must fall when training works."""
    path = tmp_path_factory.mktemp("data") / "counting.jsonl"
    return write_jsonl(path, [{"text": counting(i, 16)} for i in range(120)])


@pytest.fixture(scope="session")
def run_args(tiny: Tiny, learnable: Path) -> Callable[[Path], list[str]]:
    """`finetune run` arguments of the reference run, for an output directory (with its own swap directory)."""
    def arguments(output: Path) -> list[str]:
        swap = output.parent / f"{output.name}-swap"
        return ["run", str(tiny.model), str(learnable), "--output", str(output), *RUN_ARGS, *tiny.budget_flags(swap)]

    return arguments


@pytest.fixture(scope="session")
def reference_run(run_args: Callable[[Path], list[str]], env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The reference run, never stopped: its output directory and summary."""
    output = tmp_path_factory.mktemp("reference") / "run"
    return output, summary(run_finetune(env, *run_args(output), "--json"))


@pytest.fixture(scope="session")
def interrupted_run(run_args: Callable[[Path], list[str]], env: dict[str, str],
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference run stopped by Ctrl-C (SIGINT) after step 6; tests copy it before changing it, so its
    checkpoints are portable (one in swap stays with the swap files of the run's own --output)."""
    output = tmp_path_factory.mktemp("interrupted") / "run"
    result = interrupt_at(env, [*run_args(output), "--portable-checkpoints"], output, 6, signal.SIGINT)
    return output, result
