"""Data as users bring it, end to end (issue 14, points 1-3 and 6): ShareGPT chats, mapped columns, instruction rows
through the tokenizer's chat template, text files as whole documents (with and without --pack), a hub-style dataset
directory with configs and splits, and a --val-file in a format of its own.

Each case runs twice with the same arguments: `finetune run --dry-run` in process, where `prepare` (the real one) is
watched so that the training sequences it built can be decoded and shown to be what the model trains on, and the
installed script for real, which must train to the end. Nothing is downloaded: the data is written here, the hub is
off (HF_HUB_OFFLINE in the subprocess environment).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import Tiny, counting, run_finetune, summary, write_jsonl
from test_sources import hub_style_directory
from transformers import AutoTokenizer
from typer.testing import CliRunner

from finetune.cli import train as cli_train
from finetune.cli.data import IGNORE
from finetune.cli.main import app

pytestmark = pytest.mark.integration

RUN = ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "0"]


def _prepared(args: list, monkeypatch: pytest.MonkeyPatch) -> cli_train.Prepared:
    """What `finetune run ARGS` trains on: `prepare`'s result, from `--dry-run` in process (nothing is written)."""
    seen: list[cli_train.Prepared] = []
    real = cli_train.prepare

    def watched(*positional: object, **keywords: object) -> cli_train.Prepared:
        seen.append(real(*positional, **keywords))
        return seen[-1]

    monkeypatch.setattr(cli_train, "prepare", watched)
    result = CliRunner().invoke(app, ["run", *map(str, args), "--dry-run", "--hardware", "laptop-24gb-cpu"])
    assert result.exit_code == 0, result.output
    return seen[0]


def _train(env: dict[str, str], args: list, output: Path) -> dict:
    """The installed script on ARGS, to the end; its summary."""
    result = summary(run_finetune(env, *args, "--output", output, "--json"))
    assert result["status"] == "completed" and result["step"] == 2, result
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    return result


def _decoded(tokenizer, ids: list[int], labels: list[int]) -> tuple[str, str]:
    """(the whole sequence, the tokens that carry the loss), decoded."""
    return tokenizer.decode(ids), tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])


@pytest.fixture(scope="module")
def tokenizer(tiny: Tiny):
    return AutoTokenizer.from_pretrained(tiny.model)


def test_sharegpt_with_a_val_file_in_another_format(tiny: Tiny, env, tmp_path: Path, tokenizer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ShareGPT dumps train as chats, every gpt turn trained on; --val-file is text and is detected as text (it
    used to be checked against the training format: "--format chat needs fields messages")."""
    rows = [{"id": i, "conversations": [{"from": "system", "value": "count"},
                                        {"from": "human", "value": counting(i, 3)},
                                        {"from": "gpt", "value": counting(i + 3, 3)}]} for i in range(8)]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": counting(i, 8)} for i in range(4)])
    args = [tiny.model, data, "--val-file", val, "--seq-len", "64", *RUN]
    prepared = _prepared([*args, "--output", tmp_path / "dry"], monkeypatch)
    whole, trained = _decoded(tokenizer, prepared.train.ids[0], prepared.train.labels[0])
    assert whole == "<|system|>\ncount</s>\n<|user|>\none two three</s>\n<|assistant|>\nfour five six</s>\n"
    assert trained == "four five six</s>\n"
    assert tokenizer.decode(prepared.val.ids[0]) == f"<s>{counting(0, 8)}</s>"  # text: BOS/EOS, all trained
    assert _train(env, ["run", *args], tmp_path / "run")["format"] == "chat"


def test_mapped_columns_and_a_hub_style_directory(tiny: Tiny, env, tmp_path: Path, tokenizer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset as `hf download --repo-type dataset` leaves it: its card's configs, --dataset-config and --split
    choose the files, --val-split the eval data, and --columns maps its question/answer to prompt/completion."""
    root = hub_style_directory(tmp_path / "counting")
    (root / "pairs" / "part-0.csv").write_text(
        "question,answer\n" + "".join(f"{counting(i, 3)},{' ' + counting(i + 3, 2)}\n" for i in range(8)))
    (root / "pairs" / "test.csv").write_text("question,answer\none,two\nthree,four\n")
    card = (root / "README.md").read_text().replace(
        "    path: pairs/*.csv\n", "    path: pairs/part-*.csv\n  - split: test\n    path: pairs/test.csv\n")
    (root / "README.md").write_text(card)
    args = [tiny.model, root, "--dataset-config", "pairs", "--split", "train", "--val-split", "test",
            "--columns", "prompt=question,completion=answer", "--seq-len", "32", *RUN]
    prepared = _prepared([*args, "--output", tmp_path / "dry"], monkeypatch)
    assert (len(prepared.train), len(prepared.val)) == (8, 2)
    whole, trained = _decoded(tokenizer, prepared.train.ids[0], prepared.train.labels[0])
    assert (whole, trained) == ("<s>one two three four five</s>", " four five</s>")
    assert _decoded(tokenizer, prepared.val.ids[1], prepared.val.labels[1]) == ("<s>threefour</s>", "four</s>")
    assert _train(env, ["run", *args], tmp_path / "run")["format"] == "prompt-completion"


def test_instruction_rows_through_the_chat_template(tiny: Tiny, env, tmp_path: Path, tokenizer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer has a chat template, so Alpaca rows are trained as the chats the model will be prompted with:
    the user turn is the instruction, a blank line and the input; only the output is trained on."""
    rows = [{"instruction": "count on", "input": counting(i, 2), "output": counting(i + 2, 3)} for i in range(6)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    args = [tiny.model, data, "--seq-len", "96", *RUN]
    prepared = _prepared([*args, "--output", tmp_path / "dry"], monkeypatch)
    whole, trained = _decoded(tokenizer, prepared.train.ids[0], prepared.train.labels[0])
    assert whole == "<|user|>\ncount on\n\none two</s>\n<|assistant|>\nthree four five</s>\n"
    assert trained == "three four five</s>\n"
    alpaca = _prepared([*args, "--template", "alpaca", "--output", tmp_path / "dry-alpaca"], monkeypatch)
    assert tokenizer.decode(alpaca.train.ids[0]) == \
        "<s>### Instruction:\ncount on\n\n### Input:\none two\n\n### Response:\nthree four five</s>"
    assert _train(env, ["run", *args], tmp_path / "run")["format"] == "instruction"


def _corpus(directory: Path) -> list[str]:
    """Two files as a code or prose corpus has them: lines, indentation, blank lines."""
    directory.mkdir()
    texts = ["def count():\n    " + counting(0, 6) + "\n\n    " + counting(6, 6) + "\n",
             "# Notes\n\n" + "\n".join(counting(i, 5) for i in range(6)) + "\n"]
    (directory / "count.txt").write_text(texts[0])
    (directory / "notes.md").write_text(texts[1])
    return texts


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_text_files_are_whole_documents(pack: bool, tiny: Tiny, env, tmp_path: Path, tokenizer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each .txt/.md file is one document: its newlines kept, one BOS before it and one EOS after it (they used
    to be one example per line, newlines dropped, each line in BOS/EOS even with --pack). Unpacked, a document
    longer than --seq-len goes on in sequences of its own; packed, documents follow each other."""
    texts = _corpus(tmp_path / "corpus")
    args = [tiny.model, tmp_path / "corpus", "--seq-len", "16", *RUN, *(["--pack"] if pack else [])]
    prepared = _prepared([*args, "--output", tmp_path / "dry"], monkeypatch)
    ids = [token for sequence in prepared.train.ids for token in sequence]
    assert ids.count(tokenizer.bos_token_id) == ids.count(tokenizer.eos_token_id) == 2  # one each per document
    assert tokenizer.decode(ids) == "".join(f"<s>{text}</s>" for text in texts)  # every token, newlines kept
    assert "\n" in tokenizer.decode(prepared.train.ids[0])
    if pack:
        assert all(len(sequence) == 16 for sequence in prepared.train.ids[:-1])
    else:  # no sequence holds the end of one document and the start of the other
        assert not any(tokenizer.eos_token_id in s[:-1] for s in prepared.train.ids)
    assert _train(env, ["run", *args], tmp_path / "run")["format"] == "text"


def test_text_unit_line_is_the_old_behaviour(tiny: Tiny, tmp_path: Path, tokenizer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _corpus(tmp_path / "corpus")
    prepared = _prepared([tiny.model, tmp_path / "corpus", "--text-unit", "line", "--seq-len", "16", *RUN,
                          "--output", tmp_path / "dry"], monkeypatch)
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    assert sorted(tokenizer.decode(ids) for ids in prepared.train.ids) == sorted(f"<s>{line}</s>" for line in lines)


def test_run_config_records_the_data_options(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The options that shape the data are in the config a resume compares (and none may change on resume)."""
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": counting(i, 3), "a": " " + counting(i + 3, 2)} for i in range(4)])
    prepared = _prepared([tiny.model, data, "--columns", "prompt=q,completion=a", "--seq-len", "16", *RUN,
                          "--output", tmp_path / "dry"], monkeypatch)
    saved = json.loads(json.dumps(prepared.config.to_dict()))
    assert (saved["columns"], saved["template"], saved["text_unit"], saved["split"]) == \
        ("prompt=q,completion=a", "auto", "document", "train")
