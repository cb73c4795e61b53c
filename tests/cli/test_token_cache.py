"""Tokenize once: the token cache (cli/token_cache.py) and the Arrow-backed sequences (cli/sequences.py).

A second tokenization of the same data, tokenizer and settings reads the entry the first one wrote (the build
function is not called again) and gives the same sequences, fingerprint included; any change to what the tokens
depend on misses. References: the sequences tokenized without a cache, and the fingerprint's definition from
when sequences were Python lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from array import array
from pathlib import Path

import pyarrow as pa
import pytest
from cli_support import Tiny, counting, write_jsonl
from datasets import Dataset
from transformers import AutoTokenizer

from finetune.cli import sequences as sequences_module
from finetune.cli.config import RESUMABLE_CHANGES, RunConfig
from finetune.cli.data import Format, detect_format, load_rows, tokenize_rows
from finetune.cli.errors import FinetuneError
from finetune.cli.sequences import IGNORE, SEQUENCES_FILE, Sequences
from finetune.cli.token_cache import TOKEN_SETTINGS, TokenCache

NOT_TOKENS = RESUMABLE_CHANGES | {
    "dtype", "trust_remote_code", "eval_every", "steps", "epochs", "batch_size", "accumulation_steps", "lr",
    "schedule", "warmup_steps", "min_lr", "weight_decay", "max_grad_norm", "clip_mode", "optimizer", "lora",
    "qlora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "storage_dtype", "keep_best", "optimizer_args",
}
"""RunConfig fields that do not change what is tokenized (model, dataset, val_file and tokenizer are paths: the
cache keys the files and the tokenizer by content instead)."""


@pytest.fixture(scope="module")
def tokenizer(tiny: Tiny):
    return AutoTokenizer.from_pretrained(tiny.model)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", [{"text": counting(i, 9 + i % 7)} for i in range(40)])


def _config(tiny: Tiny, data: Path, **options: object) -> RunConfig:
    return RunConfig(model=str(tiny.model), dataset=str(data), seq_len=16, **options)


def _tokenize(root: Path | None, config: RunConfig, tokenizer, built: list | None = None) -> Sequences:
    """The training part as `finetune run` tokenizes it (cli/train.py), recording each build in `built`."""
    rows = load_rows(config.dataset)
    fmt = detect_format(rows.column_names, config.format, config.dataset)

    def build(directory: Path | None) -> Sequences:
        if built is not None:
            built.append(directory)
        return tokenize_rows(rows, fmt, tokenizer, seq_len=config.seq_len, pack=config.pack,
                             train_on_prompt=config.train_on_prompt, source=config.dataset, directory=directory)

    return TokenCache(root, config, tokenizer).sequences("train", config.dataset, fmt.value, rows, build)


def _same(a: Sequences, b: Sequences) -> None:
    assert a.ids == b.ids and a.labels == b.labels and a.fingerprint() == b.fingerprint()
    assert (a.starts is None) == (b.starts is None) and (a.starts is None or a.starts == b.starts)


def test_every_setting_is_classified() -> None:
    """A new RunConfig field must be put in TOKEN_SETTINGS (it changes the tokens) or in NOT_TOKENS here: a field
    left out of the key would let a changed run read stale tokens."""
    fields = {field.name for field in dataclasses.fields(RunConfig)}
    assert set(TOKEN_SETTINGS) <= fields
    assert fields - set(TOKEN_SETTINGS) - NOT_TOKENS == set(), "classify these fields"
    assert not set(TOKEN_SETTINGS) & NOT_TOKENS


@pytest.mark.parametrize("pack", [False, True], ids=["truncated", "packed"])
def test_second_run_reads_the_cache(pack: bool, tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    config = _config(tiny, data, pack=pack)
    built: list = []
    first = _tokenize(tmp_path / "cache", config, tokenizer, built)
    again = _tokenize(tmp_path / "cache", config, tokenizer, built)
    assert len(built) == 1  # the second one did not tokenize
    _same(first, again)
    _same(again, _tokenize(None, config, tokenizer))  # the same as without a cache
    entries = list((tmp_path / "cache" / "tokens").iterdir())
    assert [entry.name.startswith(".") for entry in entries] == [False]  # one entry, nothing left being built


def test_a_resumed_run_hits_with_the_tokenizer_from_its_checkpoint(tiny: Tiny, data: Path, tokenizer,
                                                                  tmp_path: Path) -> None:
    """--resume loads the tokenizer from the checkpoint directory: the same tokenizer at another path."""
    config = _config(tiny, data)
    built: list = []
    _tokenize(tmp_path / "cache", config, tokenizer, built)
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    _tokenize(tmp_path / "cache", config, AutoTokenizer.from_pretrained(tmp_path / "checkpoint"), built)
    assert len(built) == 1


def test_what_changes_the_tokens_misses(tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    config = _config(tiny, data)
    built: list = []
    _tokenize(tmp_path / "cache", config, tokenizer, built)
    _tokenize(tmp_path / "cache", dataclasses.replace(config, seq_len=12), tokenizer, built)  # a setting
    _tokenize(tmp_path / "cache", dataclasses.replace(config, pack=True), tokenizer, built)
    other = AutoTokenizer.from_pretrained(tiny.model)
    other.chat_template = "{{ messages }}"
    _tokenize(tmp_path / "cache", config, other, built)  # the tokenizer
    data.write_text(data.read_text() + '{"text": "one two three four"}\n')  # the data (size and mtime)
    changed = _tokenize(tmp_path / "cache", config, tokenizer, built)
    assert len(built) == 5
    _same(changed, _tokenize(None, config, tokenizer))
    os.utime(data, ns=(1, 1))  # the same bytes, touched: missing is the safe side
    _tokenize(tmp_path / "cache", config, tokenizer, built)
    assert len(built) == 6


def test_a_damaged_entry_is_rebuilt(tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    config = _config(tiny, data)
    built: list = []
    first = _tokenize(tmp_path / "cache", config, tokenizer, built)
    expected = Sequences(first.ids[:], first.labels[:])  # a copy: `first` maps the file damaged below
    del first
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    with (entry / SEQUENCES_FILE).open("r+b") as file:
        file.truncate(100)
    _same(_tokenize(tmp_path / "cache", config, tokenizer, built), expected)
    assert len(built) == 2


def test_an_unwritable_cache_tokenizes_in_memory(tiny: Tiny, data: Path, tokenizer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")  # a cache root under a file: mkdir fails, as on a read-only disk
    sequences = _tokenize(tmp_path / "file" / "cache", _config(tiny, data), tokenizer)
    _same(sequences, _tokenize(None, _config(tiny, data), tokenizer))
    assert "cannot be written" in capsys.readouterr().err


def test_abandoned_builds_are_removed(tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    """A run killed while tokenizing leaves .KEY.PID.RANDOM.tmp; the next build removes it once its process is
    gone."""
    tokens = tmp_path / "cache" / "tokens"
    dead = tokens / ".abc.999999999.0a1b.tmp"
    dead.mkdir(parents=True)
    alive = tokens / f".abc.{os.getpid()}.0a1b.tmp"
    alive.mkdir()
    _tokenize(tmp_path / "cache", _config(tiny, data), tokenizer)
    assert not dead.exists() and alive.exists()


def test_the_file_is_memory_mapped(tiny: Tiny, tokenizer, tmp_path: Path) -> None:
    """Opening the entry and reading sequences allocates nothing of the file's size: its pages are the data."""
    data = write_jsonl(tmp_path / "big.jsonl", [{"text": counting(i, 400)} for i in range(300)])
    config = _config(tiny, data, pack=True)
    _tokenize(tmp_path / "cache", config, tokenizer)
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    size = (entry / SEQUENCES_FILE).stat().st_size
    before = pa.total_allocated_bytes()
    sequences = Sequences.open(entry)
    tokens = sum(len(sequences.arrays(i)[0]) for i in range(len(sequences)))
    assert size > 2**19 and tokens * 8 < size * 1.1  # ids and labels, int32: the file is the tokens
    assert pa.total_allocated_bytes() - before < size / 10


def test_several_processes_give_the_same_sequences(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large rows are tokenized by `datasets.map` in several processes; the order and the tokens are the same,
    and an error in a worker names its row."""
    rows = Dataset.from_list([{"text": counting(i, 5 + i % 11)} for i in range(60)])
    one = tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=16, pack=True, train_on_prompt=False, source="rows")
    monkeypatch.setattr(sequences_module, "BYTES_PER_PROCESS", 1)
    two = tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=16, pack=True, train_on_prompt=False, source="rows")
    _same(one, two)
    chats = [{"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]}] * 40
    chats[33] = {"messages": [{"role": "wizard", "content": "one"}, {"role": "assistant", "content": "two"}]}
    with pytest.raises(FinetuneError, match="rows row 34: a message has role 'wizard'"):
        tokenize_rows(Dataset.from_list(chats), Format.CHAT, tokenizer, seq_len=64, pack=False,
                      train_on_prompt=False, source="rows")


def test_packed_sequences_record_where_examples_start(tokenizer) -> None:
    """Each packed sequence lists the starts of its examples (0 first, also for the tail of a cut example), and
    the first token of each example is no target (Note [Packed boundaries])."""
    rows = Dataset.from_list([{"text": counting(i, 4)} for i in range(6)])
    plain = tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=64, pack=False, train_on_prompt=False,
                          source="rows")
    packed = tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=16, pack=True, train_on_prompt=False,
                           source="rows")
    lengths = [len(ids) for ids in plain.ids]
    stream_starts = [sum(lengths[:k]) for k in range(len(lengths))]
    for row in range(len(packed)):
        begin = row * 16
        expected = sorted({0} | {s - begin for s in stream_starts if begin <= s < begin + 16})
        assert packed.starts[row] == expected
        labels = packed.labels[row]
        assert all(labels[s] == IGNORE for s in expected if begin + s in stream_starts)
    assert sum(packed.ids, []) == sum(plain.ids, [])


def test_fingerprint_is_the_one_of_python_lists() -> None:
    """The definition of when sequences were lists (int64 per token, ids then labels): checkpoints of runs made
    before keep resuming."""
    ids, labels = [[5, 6, 7], [8, 9]], [[IGNORE, 6, 7], [IGNORE, 9]]
    digest = hashlib.sha256()
    for sequence, targets in zip(ids, labels):
        digest.update(array("q", sequence).tobytes())
        digest.update(array("q", targets).tobytes())
    assert Sequences(ids, labels).fingerprint() == digest.hexdigest()


def test_no_cache_leaves_nothing_on_disk(tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    before = set(tmp_path.iterdir())
    _tokenize(None, _config(tiny, data), tokenizer)
    assert set(tmp_path.iterdir()) == before


def test_two_runs_storing_the_same_entry_both_finish(tiny: Tiny, data: Path, tokenizer, tmp_path: Path) -> None:
    """The second rename loses: that run reads the entry the first one stored and removes its own build."""
    config, root = _config(tiny, data), tmp_path / "cache"
    rows = load_rows(config.dataset)

    def build(directory: Path | None) -> Sequences:
        _tokenize(root, config, tokenizer)  # the other run, finishing first
        return tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=config.seq_len, pack=False, train_on_prompt=False,
                             source=config.dataset, directory=directory)

    sequences = TokenCache(root, config, tokenizer).sequences("train", config.dataset, "text", rows, build)
    _same(sequences, _tokenize(None, config, tokenizer))
    assert [entry.name.startswith(".") for entry in (root / "tokens").iterdir()] == [False]


def test_hub_data_is_keyed_by_the_files_datasets_keeps(data: Path, tiny: Tiny, tokenizer, tmp_path: Path) -> None:
    """A hub name is no path to stat: its rows' Arrow files in the `datasets` cache stand for it. Rows held only in
    memory have none, and are not cached."""
    import datasets

    config = _config(tiny, data)
    cache = TokenCache(tmp_path / "cache", config, tokenizer)
    hub = datasets.load_dataset("json", data_files=str(data), split="train",
                                cache_dir=str(tmp_path / "hf"))  # as a hub dataset comes: from Arrow files
    assert hub.cache_files
    built: list = []

    def build(rows):
        def make(directory: Path | None) -> Sequences:
            built.append(directory)
            return tokenize_rows(rows, Format.TEXT, tokenizer, seq_len=16, pack=False, train_on_prompt=False,
                                 source="org/name", directory=directory)
        return make

    for _ in range(2):
        cache.sequences("train", "org/name", "text", hub, build(hub))
    assert len(built) == 1 and built[0] is not None
    memory = Dataset.from_list(hub.to_list())
    cache.sequences("train", "org/name", "text", memory, build(memory))
    assert built[-1] is None and len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
