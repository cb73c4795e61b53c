"""Datasets: load rows with `datasets`, detect their format, and tokenize them into training sequences.

Every format becomes a list of (text, trainable) segments, and the labels of prompt segments are -100, so the
loss counts only completion tokens (unless `train_on_prompt`). This is how one code path serves plain text,
prompt/completion, instruction and chat data. Problems with the data are reported with the row or line they
are in, because in a 100k-line file "malformed JSON" alone does not help anyone.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FinetuneError, one_line

__all__ = ["CHAT_ROLES", "Format", "Sequences", "detect_format", "load_rows", "split_rows", "tokenize_rows"]

IGNORE = -100  # the label transformers' loss skips

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
_TOKENIZE_BATCH = 1024

CHAT_ROLES = ("system", "user", "assistant", "tool")
"""The roles a chat message may have: those of the common chat templates (tool: a function call's result)."""


class Format(str, enum.Enum):
    """How a row becomes a prompt and a completion."""

    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    CHAT = "chat"


_FIELDS = {
    Format.CHAT: ("messages",),
    Format.INSTRUCTION: ("instruction", "output"),
    Format.PROMPT_COMPLETION: ("prompt", "completion"),
    Format.TEXT: ("text",),
}  # in detection order: the most specific first


@dataclass
class Sequences:
    """Token ids and labels, one list per training sequence, each at most seq_len long."""

    ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """A hash of every token and label. A resumed run compares it with the checkpoint's to prove that it
        sees the same data in the same order."""
        digest = hashlib.sha256()
        for ids, labels in zip(self.ids, self.labels):
            digest.update(array("q", ids).tobytes())
            digest.update(array("q", labels).tobytes())
        return digest.hexdigest()


def load_rows(source: str, *, label: str = "dataset") -> Any:
    """The rows of a local file, a directory of files, or a `datasets` hub name, as a `datasets.Dataset`.

    Raises:
        FinetuneError: missing path, no data files, a malformed line (with its number), no rows, or a hub name
            that cannot be reached.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its failure logs would repeat our one-line error
    path = Path(source).expanduser()
    if path.exists():
        rows = _load_local(datasets, path, label)
    elif path.suffix in _BUILDERS or source.startswith((".", "/", "~")):
        raise FinetuneError(f"{label} {source} does not exist; check the path")
    else:
        rows = _load_hub(datasets, source, label)
    if len(rows) == 0:
        raise FinetuneError(f"{label} {source} has no rows; add examples or point at another file")
    return rows


def _load_local(datasets: Any, path: Path, label: str) -> Any:
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and not p.name.startswith(".")) \
        if path.is_dir() else [path]
    if not files:
        raise FinetuneError(f"{label} directory {path} has no {', '.join(_BUILDERS)} files")
    if files[0].suffix not in _BUILDERS:
        raise FinetuneError(f"{label} {path}: unsupported file type {files[0].suffix!r}; use {', '.join(_BUILDERS)}")
    for file in files:
        _check_readable(file, label)
    if all(f.stat().st_size == 0 for f in files):
        raise FinetuneError(f"{label} {path} is empty; add examples or point at another file")
    parts = []
    for builder in sorted({_BUILDERS[f.suffix] for f in files}):
        group = [str(f) for f in files if _BUILDERS[f.suffix] == builder]
        try:
            part = datasets.load_dataset(builder, data_files=group, split="train")
        except Exception as error:  # datasets wraps parser errors in its own types; find the line ourselves
            raise FinetuneError(_describe_load_failure(group, error)) from None
        _check_utf8(part, group)
        parts.append(part)
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:
        columns = " vs ".join(str(part.column_names) for part in parts)
        raise FinetuneError(f"{label} {path}: its files have different fields ({columns}); use one format") from None


def _check_readable(file: Path, label: str) -> None:
    """Open `file` as `datasets` will. Checked first because `datasets` may answer from its cache without opening
    the file, and when it does open it, its error does not say which file or what to do.

    Raises:
        FinetuneError: the file cannot be opened for reading (permissions, most often).
    """
    try:
        with file.open("rb"):
            pass
    except PermissionError:
        raise FinetuneError(
            f"{label} {file} is not readable (permission denied); fix its permissions (chmod a+r {file}) or run "
            "as a user who can read it"
        ) from None
    except OSError as error:
        raise FinetuneError(f"cannot read {label} {file} ({error.strerror}); check the file") from None


def _check_utf8(rows: Any, files: list[str]) -> None:
    """pyarrow's JSON reader keeps bytes that are not UTF-8 as they are, and the failure would come only when a
    row is read, as a UnicodeDecodeError with a traceback. Validating the loaded table finds them in one pass of
    its C++ code; only then are the files read line by line, for the line number.

    Raises:
        FinetuneError: a string that is not UTF-8, with its file and line.
    """
    try:
        rows.data.validate(full=True)
    except ValueError:  # pyarrow.ArrowInvalid: "Invalid UTF8 sequence"
        where = next(filter(None, (_first_non_utf8(Path(name)) for name in files)), None)
        raise FinetuneError(where or f"{', '.join(files)} holds text that is not UTF-8; re-encode it as UTF-8, e.g. "
                            "with iconv -f latin1 -t utf-8") from None


def _describe_load_failure(files: list[str], error: Exception) -> str:
    """Name the file and line of the first line that is not UTF-8 or not valid JSON, or fall back to the parser's
    message."""
    for name in files:
        location = _first_non_utf8(Path(name)) or _first_bad_json(Path(name))
        if location:
            return location
    cause = error.__cause__ or error.__context__ or error
    return f"cannot read {', '.join(files)}: {type(cause).__name__}: {one_line(str(cause))[:300]}"


def _first_non_utf8(path: Path) -> str | None:
    """The line (from 1) and column of the first byte that is not UTF-8 in a text file, with the fix; None when
    the whole file decodes. `datasets` reads text as UTF-8 and reports only a byte offset."""
    if path.suffix == ".parquet":
        return None
    with path.open("rb") as file:  # line by line: this runs on files of any size
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{path} line {number}: not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                    f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                    f"{path.with_name(path.stem + '.utf8' + path.suffix)}"
                )
    return None


def _first_bad_json(path: Path) -> str | None:
    if path.suffix not in (".json", ".jsonl"):
        return None
    text = path.read_text(errors="replace")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list) and all(isinstance(item, dict) for item in whole):
        return None  # a JSON array of records is fine
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); fix or remove the line"
        if not isinstance(record, dict):
            return f"{path} line {number}: expected a JSON object with named fields, got {type(record).__name__}"
    return None


def _load_hub(datasets: Any, name: str, label: str) -> Any:
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, no access: all end the same way for the user
        reason = one_line(str(error))[:200]
        raise FinetuneError(
            f"{label} {name} is not a local path and could not be loaded from the hub ({reason}); where the network "
            f"allows, run `hf download {name} --repo-type dataset --local-dir ./{name.split('/')[-1]}` and pass "
            f"that directory"
        ) from None


def detect_format(columns: Iterable[str], requested: Format, source: str) -> Format:
    """The requested format, or the first whose fields are all present.

    Raises:
        FinetuneError: fields missing for the requested format, or no format matches; lists the fields found.
    """
    columns = list(columns)
    candidates = [requested] if requested is not Format.AUTO else list(_FIELDS)
    for candidate in candidates:
        if all(field in columns for field in _FIELDS[candidate]):
            return candidate
    expected = "; ".join(f"{f.value}: {'+'.join(fields)}" for f, fields in _FIELDS.items())
    if requested is not Format.AUTO:
        raise FinetuneError(
            f"--format {requested.value} needs fields {', '.join(_FIELDS[requested])} but {source} has "
            f"{', '.join(columns)}; rename the fields or pick another --format ({expected})"
        )
    raise FinetuneError(
        f"cannot tell the format of {source} from its fields {', '.join(columns)}; expected one of ({expected}); "
        f"rename the fields to match"
    )


def split_rows(rows: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, validation) rows: a seeded random `fraction` held out, each part in its original order."""
    import torch

    count = round(len(rows) * fraction)
    if fraction and not 0 < count < len(rows):
        raise FinetuneError(
            f"--val-fraction {fraction} of {len(rows)} rows leaves {'no validation' if count == 0 else 'no training'} "
            f"rows; change --val-fraction or add data"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return rows.select(sorted(order[count:])), rows.select(sorted(order[:count]))


def tokenize_rows(
    rows: Any, fmt: Format, tokenizer: Any, *, seq_len: int, pack: bool, train_on_prompt: bool, source: str
) -> Sequences:
    """Tokenize every row and cut the result into sequences of at most `seq_len` tokens.

    Without packing, each row is one sequence, truncated to `seq_len`. With packing, rows are concatenated
    and cut into full windows; windows with nothing to predict are dropped.

    Raises:
        FinetuneError: a row with a bad field (named with its row number), or a prompt that leaves no room for
            the completion within `seq_len`.
    """
    segments = [_segments(row, fmt, tokenizer, train_on_prompt, source, number)
                for number, row in enumerate(rows, start=1)]
    encoded = _encode(segments, tokenizer, with_bos_eos=fmt is not Format.CHAT)
    numbered = [(number, example) for number, example in enumerate(encoded, start=1) if example is not None]
    if not numbered:
        raise FinetuneError(f"{source} has only empty rows; add examples")
    _check_prompts_fit(numbered, seq_len, source)
    if pack:
        ids = [token for _, (example_ids, _) in numbered for token in example_ids]
        labels = [label for _, (_, example_labels) in numbered for label in example_labels]
        windows = [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    else:
        windows = [(ids[:seq_len], labels[:seq_len]) for _, (ids, labels) in numbered]
    # A sequence with nothing to predict would make its micro-batch's mean loss 0/0.
    kept = [(ids, labels) for ids, labels in windows if any(label != IGNORE for label in labels[1:])]
    if not kept:
        raise FinetuneError(f"{source} has no tokens to train on (every completion is empty); check the data")
    return Sequences([ids for ids, _ in kept], [labels for _, labels in kept])


def _segments(row: dict[str, Any], fmt: Format, tokenizer: Any, train_on_prompt: bool, source: str,
              number: int) -> list[tuple[str, bool]]:
    """The row as (text, trainable) pieces; an empty list for a row with no text at all."""
    def field(name: str, *, required: bool = True) -> str:
        value = row.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise FinetuneError(f"{source} row {number}: field {name!r} should be a string, got {value!r:.60}")
        return value

    if fmt is Format.TEXT:
        text = field("text")
        return [(text, True)] if text.strip() else []
    if fmt is Format.CHAT:
        pieces = _chat_segments(row.get("messages"), tokenizer, source, number)
    elif fmt is Format.INSTRUCTION:
        extra = field("input", required=False)
        prompt = _INSTRUCTION_PROMPT.format(instruction=field("instruction"),
                                            input=f"### Input:\n{extra}\n\n" if extra else "")
        pieces = [(prompt, False), (field("output"), True)]
    else:
        pieces = [(field("prompt"), False), (field("completion"), True)]
    return [(text, trainable or train_on_prompt) for text, trainable in pieces]


def _chat_segments(messages: Any, tokenizer: Any, source: str, number: int) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; each assistant turn is trainable, the rest is prompt.

    The turns are found by rendering growing prefixes of the conversation, which works for any template
    whose rendering of a prefix is a prefix of the whole (true of the common ones, and checked).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(
            "the chat format needs the tokenizer's chat template, and this tokenizer has none; add `chat_template` "
            "to its tokenizer_config.json or pass --tokenizer with one"
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise FinetuneError(f"{source} row {number}: 'messages' should be a list of {{role, content}} strings")
    unknown = next((m["role"] for m in messages if m["role"] not in CHAT_ROLES), None)
    if unknown is not None:  # a template renders any role, so a typo would silently become prompt text
        raise FinetuneError(f"{source} row {number}: a message has role {unknown!r}; use one of "
                            f"{', '.join(CHAT_ROLES)} (only assistant turns are trained on)")
    if not any(m["role"] == "assistant" for m in messages):
        raise FinetuneError(f"{source} row {number}: no message with role 'assistant' to train on")

    def render(turns: list[dict[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt) if turns else ""

    whole, done, pieces = render(messages), "", []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], prompt=True), render(messages[: k + 1])
        if not (before.startswith(done) and through.startswith(before) and whole.startswith(through)):
            raise FinetuneError(
                f"{source} row {number}: the chat template does not render a conversation's turns as prefixes, so "
                "assistant turns cannot be told apart; pass --train-on-prompt to train on whole conversations"
            )
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return pieces + [(whole[len(done):], False)]


def _encode(rows: list[list[tuple[str, bool]]], tokenizer: Any, *,
            with_bos_eos: bool) -> list[tuple[list[int], list[int]] | None]:
    """(ids, labels) per row, tokenizing all segments in large batches (the fast tokenizer's strength)."""
    texts = [text for segments in rows for text, _ in segments]
    ids_flat: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        ids_flat += tokenizer(texts[start : start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if with_bos_eos else None
    eos = tokenizer.eos_token_id if with_bos_eos else None
    encoded: list[tuple[list[int], list[int]] | None] = []
    position = 0
    for segments in rows:
        if not segments:
            encoded.append(None)
            continue
        ids, labels = ([bos], [IGNORE]) if bos is not None else ([], [])
        for _, trainable in segments:
            piece = ids_flat[position]
            position += 1
            ids += piece
            labels += piece if trainable else [IGNORE] * len(piece)
        if eos is not None:
            ids.append(eos)
            labels.append(eos if segments[-1][1] else IGNORE)
        encoded.append((ids, labels))
    return encoded


def _check_prompts_fit(examples: list[tuple[int, tuple[list[int], list[int]]]], seq_len: int, source: str) -> None:
    """Every row (numbered from 1) must have something to predict within its first `seq_len` tokens."""
    too_long = []
    for number, (_, labels) in examples:
        first = next((i for i, label in enumerate(labels) if i >= 1 and label != IGNORE), None)
        if first is not None and first >= seq_len:
            too_long.append((number, first))
    if too_long:
        number, prompt = too_long[0]
        others = f" and {len(too_long) - 1} more" if len(too_long) > 1 else ""
        raise FinetuneError(
            f"--seq-len {seq_len} is below the prompt of {source} row {number}{others} ({prompt} prompt tokens), so "
            f"it has nothing to train on; raise --seq-len to at least {prompt + 1} or shorten the prompts"
        )
