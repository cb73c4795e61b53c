"""Data, batches and schedule, in process: which tokens carry the loss in each format, packing, the data order
that resume relies on, the learning-rate curve, and the data errors a subprocess cannot produce here."""

from __future__ import annotations

import copy
import math
import pathlib
from pathlib import Path

import pytest
from cli_support import Tiny, counting
from datasets import Dataset
from transformers import AutoTokenizer

from finetune.cli.batches import Batches, eval_batches
from finetune.cli.data import (
    IGNORE,
    Format,
    Sequences,
    Template,
    TextUnit,
    detect_format,
    load_rows,
    parse_columns,
    split_rows,
    tokenize_rows,
)
from finetune.cli.errors import FinetuneError
from finetune.cli.schedule import LearningRate, Schedule


@pytest.fixture(scope="module")
def tokenizer(tiny: Tiny):
    return AutoTokenizer.from_pretrained(tiny.model)


def _tokenize(tokenizer, rows: list[dict], fmt: Format, *, seq_len: int = 200, pack: bool = False,
              train_on_prompt: bool = False, **options: object) -> Sequences:
    return tokenize_rows(Dataset.from_list(rows), fmt, tokenizer, seq_len=seq_len, pack=pack,
                         train_on_prompt=train_on_prompt, source="rows", **options)


def _trained_text(tokenizer, sequences: Sequences, index: int = 0) -> str:
    """The tokens that carry the loss, decoded."""
    return tokenizer.decode([t for t, label in zip(sequences.ids[index], sequences.labels[index]) if label != IGNORE])


def test_prompt_completion_trains_on_the_completion_only(tokenizer) -> None:
    rows = [{"prompt": "one two three", "completion": " four five"}]
    sequences = _tokenize(tokenizer, rows, Format.PROMPT_COMPLETION)
    assert sequences.ids[0][0] == tokenizer.bos_token_id and sequences.ids[0][-1] == tokenizer.eos_token_id
    assert _trained_text(tokenizer, sequences) == " four five</s>"
    everything = _tokenize(tokenizer, rows, Format.PROMPT_COMPLETION, train_on_prompt=True)
    assert everything.labels[0][1:] == everything.ids[0][1:]  # all but BOS, which nothing predicts


def test_instruction_prompt_is_masked(tokenizer) -> None:
    """--template alpaca, and the default for a tokenizer without a chat template."""
    rows = [{"instruction": "count on", "input": "one two", "output": "three four"},
            {"instruction": "count", "input": None, "output": "one"}]
    sequences = _tokenize(tokenizer, rows, Format.INSTRUCTION, template=Template.ALPACA)
    assert tokenizer.decode(sequences.ids[0]) == \
        "<s>### Instruction:\ncount on\n\n### Input:\none two\n\n### Response:\nthree four</s>"
    assert _trained_text(tokenizer, sequences, 0) == "three four</s>"
    assert "### Input" not in tokenizer.decode(sequences.ids[1]) and \
        "### Response:" in tokenizer.decode(sequences.ids[1])
    plain = _without_chat_template(tokenizer)
    assert _tokenize(plain, rows, Format.INSTRUCTION).ids == sequences.ids


def _without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_instruction_renders_through_the_chat_template(tokenizer) -> None:
    """The default where the tokenizer has a chat template: the user turn is the instruction, a blank line and the
    input; the assistant turn, the output, is all that is trained on. No BOS/EOS beyond the template's own."""
    rows = [{"instruction": "count on", "input": "one two", "output": "three four"},
            {"instruction": "count", "input": "", "output": "one"}]
    sequences = _tokenize(tokenizer, rows, Format.INSTRUCTION)
    assert tokenizer.decode(sequences.ids[0]) == "<|user|>\ncount on\n\none two</s>\n<|assistant|>\nthree four</s>\n"
    assert tokenizer.decode(sequences.ids[1]) == "<|user|>\ncount</s>\n<|assistant|>\none</s>\n"
    assert _trained_text(tokenizer, sequences, 0) == "three four</s>\n"
    assert _tokenize(tokenizer, rows, Format.INSTRUCTION, template=Template.CHAT).ids == sequences.ids


def test_template_refusals(tokenizer) -> None:
    rows = [{"instruction": "count", "output": "one"}]
    with pytest.raises(FinetuneError, match="--template chat renders instruction rows with the tokenizer's chat "
                                            "template, and this tokenizer has none; pass --template alpaca"):
        _tokenize(_without_chat_template(tokenizer), rows, Format.INSTRUCTION, template=Template.CHAT)
    with pytest.raises(FinetuneError, match="--template alpaca is how instruction rows .* and rows is "
                                            "prompt-completion; drop --template .*--columns instruction=prompt"):
        _tokenize(tokenizer, [{"prompt": "a", "completion": "b"}], Format.PROMPT_COMPLETION, template=Template.ALPACA)


def test_chat_trains_on_every_assistant_turn(tokenizer) -> None:
    rows = [{"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                          {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]}]
    sequences = _tokenize(tokenizer, rows, Format.CHAT)
    assert tokenizer.decode(sequences.ids[0]) == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert _trained_text(tokenizer, sequences) == "two</s>\nfour</s>\n"


def test_chat_refuses_an_unknown_role(tokenizer) -> None:
    """The template would render "wizard" as prompt text; a typo in a role must not silently change the data."""
    rows = [{"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]},
            {"messages": [{"role": "wizard", "content": "one"}, {"role": "assistant", "content": "two"}]}]
    with pytest.raises(FinetuneError, match="rows row 2: a message has role 'wizard'; use one of system, user, "
                                            "assistant, tool"):
        _tokenize(tokenizer, rows, Format.CHAT)


def test_unreadable_dataset_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission (tests run as root, who reads any file, so the open is made to fail as
    it fails for anyone else; test_bad_input.py's dataset-unreadable row runs it for real where not root)."""
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"text": "one two"}\n')
    opened = pathlib.Path.open

    def open_(self: Path, *args: object, **kwargs: object) -> object:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)
    with pytest.raises(FinetuneError) as raised:
        load_rows(str(locked))
    message = str(raised.value)
    assert message == f"dataset {locked} is not readable (permission denied); fix its permissions (chmod a+r " \
                      f"{locked}) or run as a user who can read it"
    with pytest.raises(FinetuneError, match="--val-file .* is not readable"):
        load_rows(str(tmp_path), label="--val-file")  # a directory's files are checked the same way


def test_packing_fills_sequences_and_keeps_every_token(tokenizer) -> None:
    rows = [{"text": counting(i, 7)} for i in range(10)]
    plain = _tokenize(tokenizer, rows, Format.TEXT, seq_len=16)
    packed = _tokenize(tokenizer, rows, Format.TEXT, seq_len=16, pack=True)
    assert all(len(ids) == 16 for ids in packed.ids[:-1]) and len(packed.ids[-1]) <= 16
    assert sum(packed.ids, []) == sum(plain.ids, [])
    pairs = [{"prompt": "one", "completion": " " + counting(1, 7)}]
    truncated = _tokenize(tokenizer, pairs, Format.PROMPT_COMPLETION, seq_len=5)
    assert [len(ids) for ids in truncated.ids] == [5]


def test_a_long_document_continues_in_the_next_sequences(tokenizer) -> None:
    """Without --pack a document is never cut short: it goes on in sequences of its own (no other document in them)."""
    rows = [{"text": counting(0, 11)}, {"text": counting(3, 2)}]
    plain = _tokenize(tokenizer, rows, Format.TEXT, seq_len=5)
    document = [tokenizer.bos_token_id, *tokenizer(counting(0, 11), add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id]
    assert sum(plain.ids[:-1], []) == document and all(len(ids) == 5 for ids in plain.ids[:-2])
    assert tokenizer.decode(plain.ids[-1]) == f"<s>{counting(3, 2)}</s>"


def test_detect_format_prefers_the_most_specific_and_names_fields() -> None:
    assert detect_format(["text", "prompt", "completion"], Format.AUTO, "d") is Format.PROMPT_COMPLETION
    assert detect_format(["text", "prompt", "completion"], Format.TEXT, "d") is Format.TEXT
    with pytest.raises(FinetuneError, match="fields question, answer"):
        detect_format(["question", "answer"], Format.AUTO, "d")


def test_split_is_seeded_and_disjoint() -> None:
    rows = Dataset.from_list([{"text": str(i)} for i in range(50)])
    train, val = split_rows(rows, 0.2, seed=3)
    again, _ = split_rows(rows, 0.2, seed=3)
    assert len(val) == 10 and set(train["text"]).isdisjoint(val["text"]) and train["text"] == again["text"]
    with pytest.raises(FinetuneError, match="leaves no validation rows"):
        split_rows(rows, 0.001, seed=3)


def test_batches_depend_only_on_the_step() -> None:
    """Resume builds a new Batches and asks for step s directly: it must see what the first run saw."""
    sequences = Sequences([[i, i + 1] for i in range(10)], [[IGNORE, i + 1] for i in range(10)])
    first = Batches(sequences, batch_size=2, accumulation_steps=2, seed=1, pad_id=0)
    seen = [first.step(s) for s in range(1, 8)]
    resumed = Batches(sequences, batch_size=2, accumulation_steps=2, seed=1, pad_id=0)
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(resumed.step(6), seen[5]))
    epoch = [int(m["input_ids"][r, 0]) for s in range(1, 8) for m in first.step(s) for r in range(2)][:10]
    assert sorted(epoch) == list(range(10))  # each epoch visits every sequence once
    assert first.steps_for_epochs(2.0) == 5


def test_eval_batches_count_predicted_tokens() -> None:
    sequences = Sequences([[1, 2, 3], [4, 5]], [[IGNORE, 2, 3], [IGNORE, IGNORE]])
    (batch, targets), = eval_batches(sequences, 4, pad_id=0)
    assert targets == 2 and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_schedules() -> None:
    cosine = LearningRate(1.0, total_steps=12, warmup_steps=2, schedule=Schedule.COSINE, min_lr=0.1)
    assert [cosine(s) for s in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine(12) == pytest.approx(0.1) and \
        cosine(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))
    linear = LearningRate(1.0, total_steps=11, schedule=Schedule.LINEAR)
    assert [linear(s) for s in (1, 6, 11)] == pytest.approx([1.0, 0.5, 0.0])
    assert LearningRate(0.3, total_steps=5, schedule=Schedule.CONSTANT)(5) == 0.3


def test_sharegpt_conversations_are_chats(tokenizer) -> None:
    """ShareGPT's {from, value} with human, gpt and system are the chat's {role, content} with user, assistant and
    system: the same tokens and labels."""
    turns = [("system", "one"), ("user", "two"), ("assistant", "three"), ("user", "four"), ("assistant", "five")]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    chat = _tokenize(tokenizer, [{"messages": [{"role": r, "content": c} for r, c in turns]}], Format.CHAT)
    sharegpt = _tokenize(tokenizer, [{"conversations": [{"from": names[r], "value": c} for r, c in turns]}],
                         Format.CHAT)
    assert (sharegpt.ids, sharegpt.labels) == (chat.ids, chat.labels)
    assert _trained_text(tokenizer, sharegpt) == "three</s>\nfive</s>\n"
    assert detect_format(["id", "conversations"], Format.AUTO, "d") is Format.CHAT
    with pytest.raises(FinetuneError, match="rows row 1: a message has from 'bot'; use one of system, user, "
                                            r"assistant, tool \(in ShareGPT's from: human, gpt, system"):
        _tokenize(tokenizer, [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
                  Format.CHAT)
    with pytest.raises(FinetuneError, match="rows row 1: 'conversations' should be a list of messages, each "
                                            r"\{role, content\} or ShareGPT's \{from, value\}"):
        _tokenize(tokenizer, [{"conversations": [{"from": "human", "text": "a"}]}], Format.CHAT)


def test_text_units(tokenizer) -> None:
    """A text field is one document by default: its newlines kept, one BOS and one EOS around it; or one example per
    line, or per paragraph (split at blank lines)."""
    text = "one two\nthree\n\nfour five\nsix\n\n\nseven\n"
    rows = [{"text": text}, {"text": "  \n"}]
    document = _tokenize(tokenizer, rows, Format.TEXT)
    assert [tokenizer.decode(ids) for ids in document.ids] == [f"<s>{text}</s>"]
    lines = _tokenize(tokenizer, rows, Format.TEXT, text_unit=TextUnit.LINE)
    assert [tokenizer.decode(ids) for ids in lines.ids] == [f"<s>{line}</s>" for line in
                                                            ("one two", "three", "four five", "six", "seven")]
    paragraphs = _tokenize(tokenizer, rows, Format.TEXT, text_unit=TextUnit.PARAGRAPH)
    assert [tokenizer.decode(ids) for ids in paragraphs.ids] == ["<s>one two\nthree</s>", "<s>four five\nsix</s>",
                                                                 "<s>seven</s>"]
    packed = _tokenize(tokenizer, rows * 3, Format.TEXT, seq_len=8, pack=True)
    flat = sum(packed.ids, [])
    assert flat.count(tokenizer.bos_token_id) == flat.count(tokenizer.eos_token_id) == 3  # one per document


def test_columns_map_fields_to_a_format(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "one", "answer": "two", "prompt": "ignored"}\n')
    rows = load_rows(str(path), columns="prompt=question,completion=answer")
    assert sorted(rows.column_names) == ["completion", "prompt"] and rows[0] == {"prompt": "one", "completion": "two"}
    assert detect_format(rows.column_names, Format.AUTO, "d") is Format.PROMPT_COMPLETION
    assert load_rows(str(path), columns="prompt=prompt")[0]["prompt"] == "ignored"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "one", "completion": "two"}\n')
    assert load_rows(str(pairs), columns="prompt=completion,completion=prompt")[0] == {"prompt": "two",
                                                                                        "completion": "one"}
    with pytest.raises(FinetuneError, match=r"--columns completion=reply: .*qa.jsonl has no field 'reply' \(its "
                                            "fields: question, answer, prompt\\); fix the name in --columns"):
        load_rows(str(path), columns="prompt=question,completion=reply")
    assert parse_columns(" prompt = q , completion=a,") == {"prompt": "q", "completion": "a"}
    for text, problem in [("prompt", "'prompt' is not NAME=COLUMN"), ("answer=a", "'answer' is not a field"),
                          ("prompt=a,completion=a", "'a' is mapped twice")]:
        with pytest.raises(ValueError, match=problem):
            parse_columns(text)
