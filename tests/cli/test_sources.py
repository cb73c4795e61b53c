"""Where rows come from (cli/sources.py, through `load_rows`), in process: text files as documents, lines or
paragraphs; directories of mixed file types; splits from file names; a hub-style directory with a dataset card's
configs; a `save_to_disk` directory; and a hub name without a network, which must fail at once, not after the hub
client's half a minute of retries. Nothing is downloaded."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants

from finetune.cli.data import Format, TextUnit, detect_format, load_rows
from finetune.cli.errors import FinetuneError

CARD = """---
pretty_name: counting
configs:
- config_name: words
  data_files:
  - split: train
    path: words/train.jsonl
  - split: test
    path: words/test.jsonl
- config_name: pairs
  data_files:
  - split: train
    path: pairs/*.csv
---
# A dataset card (as `hf download --repo-type dataset` leaves it); its header says which files make which subset.
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hub_style_directory(root: Path) -> Path:
    """A dataset as the hub holds it: two configs (subsets), one with train and test splits, and its card."""
    root.mkdir(parents=True)
    (root / "README.md").write_text(CARD)
    _jsonl(root / "words" / "train.jsonl", [{"text": f"train {i}"} for i in range(4)])
    _jsonl(root / "words" / "test.jsonl", [{"text": f"test {i}"} for i in range(2)])
    (root / "pairs").mkdir()
    (root / "pairs" / "part-0.csv").write_text("question,answer\none,two\nthree,four\n")
    return root


def test_text_files_are_documents_lines_or_paragraphs(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Title\n\nfirst line\nsecond line\n\nlast\n")
    assert load_rows(str(notes))["text"] == [notes.read_text()]  # one row, newlines kept
    assert list(load_rows(str(notes), text_unit=TextUnit.LINE)["text"]) == \
        ["# Title", "", "first line", "second line", "", "last"]  # empty rows are skipped when tokenized
    assert len(load_rows(str(notes), text_unit=TextUnit.PARAGRAPH)) == 3


def test_a_directory_of_mixed_file_types_is_one_dataset(tmp_path: Path) -> None:
    """Files of several types in one format are combined, keeping only the format's fields; the top-level README.md
    (a dataset card, or notes about the data) is not data."""
    data = tmp_path / "data"
    _jsonl(data / "a.jsonl", [{"text": "from jsonl", "id": 1}])
    (data / "docs").mkdir()
    (data / "docs" / "b.txt").write_text("a text file\nof two lines\n")
    (data / "docs" / "c.md").write_text("# markdown\n")
    (data / "README.md").write_text("About this data.\n")
    rows = load_rows(str(data))
    assert rows.column_names == ["text"]
    assert sorted(rows["text"]) == ["# markdown\n", "a text file\nof two lines\n", "from jsonl"]


def test_a_directory_in_two_formats_is_refused_with_its_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _jsonl(data / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    (data / "notes.txt").write_text("text\n")
    with pytest.raises(FinetuneError, match=r"dataset .*data mixes formats \(.*chat.jsonl is chat; .*notes.txt is "
                                            r"text\); keep one format per dataset"):
        load_rows(str(data))
    (data / "chat.jsonl").unlink()
    _jsonl(data / "posts.jsonl", [{"body": "a post", "id": 7}])
    mapped = load_rows(str(data), columns="text=body")  # a mapping applies where its column is
    assert mapped.column_names == ["text"] and sorted(mapped["text"]) == ["a post", "text\n"]


def test_splits_from_file_names(tmp_path: Path) -> None:
    """Named as the hub names splits, files are splits; a directory whose files do not all name one is split train."""
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", [{"text": "t"}] * 3)
    _jsonl(data / "validation.jsonl", [{"text": "v"}] * 2)
    assert list(load_rows(str(data))["text"]) == ["t"] * 3
    assert list(load_rows(str(data), split="validation")["text"]) == ["v"] * 2
    with pytest.raises(FinetuneError, match=r"--val-split test: dataset .*data has no split 'test' \(its splits, "
                                            r"from its file names: train, validation\); pass one of them"):
        load_rows(str(data), split="test", split_flag="--val-split")
    _jsonl(data / "notes.jsonl", [{"text": "n"}])
    assert len(load_rows(str(data))) == 6  # notes.jsonl names no split: every file is the data
    with pytest.raises(FinetuneError, match="--split validation: dataset .* has no named splits .*notes.jsonl names "
                                            "none"):
        load_rows(str(data), split="validation")
    with pytest.raises(FinetuneError, match="--split test: dataset .*one.jsonl is one file, which is split train"):
        load_rows(str(_jsonl(tmp_path / "one.jsonl", [{"text": "x"}])), split="test")


def test_sharded_hub_layout_names_its_splits(tmp_path: Path) -> None:
    data = tmp_path / "download"
    _jsonl(data / "data" / "train-00000-of-00002.jsonl", [{"text": "a"}])
    _jsonl(data / "data" / "train-00001-of-00002.jsonl", [{"text": "b"}])
    _jsonl(data / "data" / "dev_clean-00000-of-00001.jsonl", [{"text": "c"}])
    assert sorted(load_rows(str(data))["text"]) == ["a", "b"]
    assert list(load_rows(str(data), split="dev_clean")["text"]) == ["c"]


def test_hub_style_directory_with_configs_and_splits(tmp_path: Path) -> None:
    root = hub_style_directory(tmp_path / "counting")
    assert list(load_rows(str(root), config="words")["text"]) == [f"train {i}" for i in range(4)]
    assert list(load_rows(str(root), config="words", split="test")["text"]) == ["test 0", "test 1"]
    pairs = load_rows(str(root), config="pairs", columns="prompt=question,completion=answer")
    assert detect_format(pairs.column_names, Format.AUTO, "d") is Format.PROMPT_COMPLETION and len(pairs) == 2
    with pytest.raises(FinetuneError, match=r"dataset .*counting has several configs \(words, pairs\); choose one with "
                                            "--dataset-config"):
        load_rows(str(root))
    with pytest.raises(FinetuneError, match=r"--dataset-config nope: dataset .*counting has no config 'nope' \(its "
                                            r"configs: words, pairs\)"):
        load_rows(str(root), config="nope")
    with pytest.raises(FinetuneError, match=r"--split dev: dataset .*counting \(config words\) has no split 'dev' "
                                            r"\(its splits: train, test\); pass one of them to --split"):
        load_rows(str(root), config="words", split="dev")
    with pytest.raises(FinetuneError, match="--dataset-config words: dataset .*plain.jsonl has no configs"):
        load_rows(str(_jsonl(tmp_path / "plain.jsonl", [{"text": "x"}])), config="words")


def test_hub_style_directory_names_a_malformed_file(tmp_path: Path) -> None:
    root = hub_style_directory(tmp_path / "counting")
    (root / "words" / "test.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(FinetuneError, match=r"words/test.jsonl line 2: not valid JSON"):
        load_rows(str(root), config="words", split="test")


def test_save_to_disk_directory(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}]),
                          "test": datasets.Dataset.from_list([{"text": "b"}])}).save_to_disk(str(tmp_path / "saved"))
    assert list(load_rows(str(tmp_path / "saved"), split="test")["text"]) == ["b"]
    with pytest.raises(FinetuneError, match=r"has no split 'dev' \(its splits: train, test\)"):
        load_rows(str(tmp_path / "saved"), split="dev")


def test_a_hub_name_without_a_network_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the hub client is switched to offline mode (a cached dataset would still load) instead of
    retrying for about 25 s; the error is one line with the download command."""
    def unreachable(address: tuple[str, int], timeout: float) -> socket.socket:
        raise OSError(101, "Network is unreachable")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(FinetuneError) as raised:
        load_rows("some-org/some-data", config="tiny")
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert message.startswith("dataset some-org/some-data (config tiny) is not a local path and could not be loaded "
                              "from the hub (no network: cannot connect to huggingface.co:443, Network is unreachable; "
                              "not in the datasets cache either)"), message
    assert "hf download some-org/some-data --repo-type dataset --local-dir ./some-data" in message
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_hub_offline_mode_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FinetuneError, match=r"could not be loaded from the hub \(offline mode: HF_HUB_OFFLINE is set; "
                                            "not in the datasets cache either\\)"):
        load_rows("some-org/some-data")


def test_chats_of_two_file_types_are_one_dataset(tmp_path: Path) -> None:
    data = tmp_path / "chats"
    turns = [{"from": "human", "value": "one"}, {"from": "gpt", "value": "two"}]
    _jsonl(data / "a.jsonl", [{"conversations": turns, "id": 1}])
    (data / "b.json").write_text(json.dumps([{"conversations": turns, "source": "x"}]))
    rows = load_rows(str(data))
    assert rows.column_names == ["messages"] and len(rows) == 2
    assert detect_format(rows.column_names, Format.AUTO, "d") is Format.CHAT


def test_a_card_default_config_and_data_dir(tmp_path: Path) -> None:
    root = tmp_path / "card"
    _jsonl(root / "en" / "train.jsonl", [{"text": "english"}])
    _jsonl(root / "en" / "test.jsonl", [{"text": "english test"}])
    _jsonl(root / "fr" / "train.jsonl", [{"text": "french"}])
    (root / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_dir: en\n  default: true\n"
                                    "- config_name: fr\n  data_files: fr/*.jsonl\n---\n")
    assert list(load_rows(str(root))["text"]) == ["english"]  # the default config; data_dir's files by their names
    assert list(load_rows(str(root), split="test")["text"]) == ["english test"]
    assert list(load_rows(str(root), config="fr")["text"]) == ["french"]
    with pytest.raises(FinetuneError, match=r"--split test: .*card \(config fr\) has no split 'test' \(its splits: "
                                            "train\\)"):
        load_rows(str(root), config="fr", split="test")
