"""`finetune generate` and `finetune chat` on a model, on a finished run, and on bad input: the tokens equal
`model.generate` of the same weights in memory, with the budget at the engine's minimum (the model streams).

The LoRA cases (an adapter on the streamed base) are in test_lora_cli.py, beside the LoRA run they use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import Tiny, run_finetune
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 10


def budget(tiny: Tiny) -> list[str]:
    """The engine's minimum for the tiny model, plus room for the KV cache of a short context."""
    return ["--device-memory", str(tiny.device_bytes + (1 << 20)), "--host-memory", str(tiny.host_bytes)]


def generated(env: dict[str, str], source: Path, prompt: str, *extra: str) -> dict:
    result = run_finetune(env, "generate", source, "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), *extra,
                          "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def in_memory(model_dir: Path, prompt: str, **options: object) -> list[int]:
    """The new tokens of `model.generate` on the model loaded whole, greedy unless `options` say otherwise."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(options.pop("seed", 0))
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **{"do_sample": False, **options})
    return out[0, ids.shape[1]:].tolist()


def test_generate_equals_model_generate(tiny: Tiny, env: dict[str, str]) -> None:
    result = generated(env, tiny.model, "three four five", *budget(tiny))
    assert result["token_ids"] == in_memory(tiny.model, "three four five")
    assert result["new_tokens"] == len(result["token_ids"]) > 0 and result["peak_rss"] > 0


def test_sampling_is_seeded_and_equals_model_generate(tiny: Tiny, env: dict[str, str]) -> None:
    sampling = ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    result = generated(env, tiny.model, "seven", *sampling, *budget(tiny))
    assert result["token_ids"] == in_memory(tiny.model, "seven", do_sample=True, temperature=1.5, top_k=50,
                                            top_p=0.95, seed=7)


def test_a_finished_run_generates_with_its_final_model(reference_run, env: dict[str, str]) -> None:
    output, _ = reference_run
    result = generated(env, output, "one two three")
    assert result["model"] == str(output / "final")
    assert result["token_ids"] == in_memory(output / "final", "one two three")


def test_generate_streams_the_text(tiny: Tiny, env: dict[str, str]) -> None:
    result = run_finetune(env, "generate", tiny.model, "--prompt", "five six", "--max-new-tokens", str(NEW_TOKENS),
                          *budget(tiny))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    text = tokenizer.decode(in_memory(tiny.model, "five six"), skip_special_tokens=True)
    assert result.stdout.strip() == text.strip()
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_chat_answers_each_turn_through_the_template(tiny: Tiny, env: dict[str, str]) -> None:
    turns = "one two\n/reset\nthree four\n/exit\nnever read\n"
    result = run_finetune(env, "chat", tiny.model, "--max-new-tokens", str(NEW_TOKENS), *budget(tiny), input=turns)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    replies = []
    for turn in ("one two", "three four"):  # /reset between them: each starts a new conversation
        ids = tokenizer.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    lines = result.stdout.splitlines()
    assert lines == [replies[0], "(conversation reset)", replies[1]]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--temperature", "-1"], 2, "--temperature -1.0 must be >= 0"),
    (["--top-p", "0"], 2, "--top-p 0.0 must be in (0, 1]"),
    (["--max-new-tokens", "0"], 2, "--max-new-tokens 0 must be >= 1"),
    (["--max-new-tokens", "2000"], 1, "beyond the model's context of 1024"),
    (["--memory", "64KB"], 1, "--memory 64KB is below the minimum"),
])
def test_bad_options_get_one_error_line(args: list[str], code: int, message: str, tiny: Tiny,
                                        env: dict[str, str]) -> None:
    result = run_finetune(env, "generate", tiny.model, "--prompt", "one", *args)
    assert result.returncode == code
    assert result.stderr.strip().startswith("Error:") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr, result.stderr


def test_a_directory_that_holds_no_model_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_finetune(env, "generate", tmp_path, "--prompt", "one")
    assert result.returncode == 1 and result.stderr.startswith("Error:"), result.stderr


def test_sample_every_writes_completions_and_leaves_the_run_as_it_was(run_args, reference_run, env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """The reference run again with --sample-every 8: the same losses (sampling draws no random numbers), samples
    at steps 8, 16 and 24, and the last ones equal to model.generate of the run's final model."""
    output = tmp_path / "run"
    result = run_finetune(env, *run_args(output), "--sample-every", "8", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (reference_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in reference if "loss" in r]
    sampled = [r for r in records if "samples" in r]
    assert [r["step"] for r in sampled] == [8, 16, 24] and all(len(r["samples"]) == 2 for r in sampled)
    assert sampled[-1]["samples"][0]["prompt"] != sampled[-1]["samples"][1]["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(output / "final")
    model = AutoModelForCausalLM.from_pretrained(output / "final").eval()
    for sample in sampled[-1]["samples"]:
        ids = torch.tensor([sample["prompt_ids"]])
        assert len(sample["prompt_ids"]) == 16
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == sample["prompt"]
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == sample["completion"]
