"""Datasets: the rows cli/sources.py reads, their format, and their tokens.

The user's fields are first renamed to the formats' names (`--columns prompt=question`), and the format is the
first whose fields are all there (or `--format`):

    text                 text                       a document (or a line or paragraph of it: --text-unit)
    prompt-completion    prompt, completion         the prompt as it is, then the completion
    instruction          instruction, input, output as a chat (the user turn: instruction, a blank line, input) with
                                                    the tokenizer's chat template, else the Alpaca prompt (--template)
    chat                 messages or conversations  [{role, content}] or ShareGPT's [{from, value}] (human, gpt,
                                                    system), with the tokenizer's chat template

Every format becomes a list of (text, trainable) segments, and the labels of prompt segments are -100, so the
loss counts only completion tokens (every assistant turn of a chat) unless `train_on_prompt`. This is how one code
path serves plain text, prompt/completion, instruction and chat data. Problems with a row are reported with the
row's number and the file it is in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import FinetuneError
from .formats import COLUMN_NAMES, Format, Template, parse_columns
from .sequences import IGNORE, Cut, Sequences, build_sequences
from .sources import Part, TextUnit, read_parts

__all__ = ["CHAT_ROLES", "COLUMN_NAMES", "Format", "Sequences", "Template", "TextUnit", "detect_format", "load_rows",
           "parse_columns", "split_rows", "tokenize_rows"]

_INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
_TOKENIZE_BATCH = 1024

CHAT_ROLES = ("system", "user", "assistant", "tool")
"""The roles a chat message may have: those of the common chat templates (tool: a function call's result)."""

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""ShareGPT's `from` values, as chat roles (a chat role itself is taken as it is)."""


_FIELDS = {
    Format.CHAT: ("messages",),
    Format.INSTRUCTION: ("instruction", "output"),
    Format.PROMPT_COMPLETION: ("prompt", "completion"),
    Format.TEXT: ("text",),
}  # in detection order: the most specific first
_CHAT_FIELDS = ("messages", "conversations")  # a chat is either (ShareGPT's name is conversations)
_READS = {Format.INSTRUCTION: ("instruction", "input", "output"), Format.PROMPT_COMPLETION: ("prompt", "completion"),
          Format.TEXT: ("text",)}
"""Every field each format but chat reads (the others are dropped when the files of a directory are combined; a
chat keeps `messages`, to which ShareGPT's `conversations` is renamed)."""

def load_rows(source: str, *, label: str = "dataset", config: str | None = None, split: str = "train",
              columns: str | None = None, fmt: Format = Format.AUTO, text_unit: TextUnit = TextUnit.DOCUMENT,
              split_flag: str = "--split") -> Any:
    """The rows of a local file, a directory of files, or a `datasets` hub name, as a `datasets.Dataset` whose
    fields have the formats' names.

    Args:
        source, label, config, split, text_unit, split_flag: what to read and how to name it (cli/sources.py).
        columns: `--columns`, applied to each file type's rows where they have the column (rows that have the
            format's own name need none).
        fmt: `--format`; the file types of a directory must all come out in one format.

    Raises:
        FinetuneError: any problem cli/sources.py finds; a mapped column that is not there; files of a directory
            in different formats; no rows.
    """
    mapping = parse_columns(columns)
    parts = [Part(_map_columns(part.rows, mapping, part.where), part.where)
             for part in read_parts(source, label=label, config=config, split=split, text_unit=text_unit,
                                    split_flag=split_flag)]
    rows = parts[0].rows if len(parts) == 1 else _combine(parts, fmt, label, source)
    if len(rows) == 0:
        raise FinetuneError(f"{label} {source} has no rows; add examples or point at another file")
    return rows


def _map_columns(rows: Any, mapping: dict[str, str], where: str) -> Any:
    """`rows` with each mapped column renamed to its format name (a field already of that name is replaced)."""
    fields = rows.column_names
    for name, column in mapping.items():
        if column not in fields and name not in fields:
            raise FinetuneError(f"--columns {name}={column}: {where} has no field {column!r} (its fields: "
                                f"{', '.join(fields)}); fix the name in --columns")
    present = {column: name for name, column in mapping.items() if column in fields and column != name}
    replaced = [name for name in present.values() if name in fields and name not in present]
    rows = rows.remove_columns(replaced) if replaced else rows
    return rows.rename_columns(present) if present else rows


def _combine(parts: list[Part], fmt: Format, label: str, source: str) -> Any:
    """One dataset of a directory's file types: each must be in the same format; only that format's fields are
    kept (an instruction file without `input` gets an empty one)."""
    import datasets

    formats = [detect_format(part.rows.column_names, fmt, part.where) for part in parts]
    if len(set(formats)) > 1:
        listing = "; ".join(f"{part.where} is {kind.value}" for part, kind in zip(parts, formats))
        raise FinetuneError(f"{label} {source} mixes formats ({listing}); keep one format per dataset (a directory "
                            "for each), or map the fields to one format's names with --columns")
    if formats[0] is Format.CHAT:
        wanted = ["messages"]  # a chat's one field: ShareGPT's conversations are renamed to it
    else:
        wanted = [name for name in _READS[formats[0]] if any(name in part.rows.column_names for part in parts)]
    selected = []
    for part in parts:
        rows = part.rows
        if formats[0] is Format.CHAT and "messages" not in rows.column_names:
            rows = rows.rename_column("conversations", "messages")
        for name in wanted:
            if name not in rows.column_names:
                rows = rows.add_column(name, [""] * len(rows))
        selected.append(rows.select_columns(wanted))
    try:
        return datasets.concatenate_datasets(selected)
    except ValueError:
        types = " vs ".join(f"{part.where}: {rows.features}" for part, rows in zip(parts, selected))
        raise FinetuneError(f"{label} {source}: its files hold the same fields with different types ({types}); "
                            "convert them to one layout") from None


def detect_format(columns: Iterable[str], requested: Format, source: str) -> Format:
    """The requested format, or the first whose fields are all present.

    Raises:
        FinetuneError: fields missing for the requested format, or no format matches; lists the fields found.
    """
    columns = list(columns)
    candidates = [requested] if requested is not Format.AUTO else list(_FIELDS)
    for candidate in candidates:
        if _has_fields(candidate, columns):
            return candidate
    expected = "; ".join(f"{f.value}: {_needs(f)}" for f in _FIELDS)
    if requested is not Format.AUTO:
        raise FinetuneError(
            f"--format {requested.value} needs fields {_needs(requested)} but {source} has {', '.join(columns)}; map "
            f"your fields to those names with --columns (e.g. --columns prompt=question,completion=answer), or pick "
            f"another --format ({expected})"
        )
    raise FinetuneError(
        f"cannot tell the format of {source} from its fields {', '.join(columns)}; expected one of ({expected}); "
        f"map your fields to these names with --columns, e.g. --columns prompt=question,completion=answer"
    )


def _has_fields(fmt: Format, columns: list[str]) -> bool:
    if fmt is Format.CHAT:
        return any(name in columns for name in _CHAT_FIELDS)
    return all(name in columns for name in _FIELDS[fmt])


def _needs(fmt: Format) -> str:
    return "messages (or conversations)" if fmt is Format.CHAT else "+".join(_FIELDS[fmt])


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
    rows: Any, fmt: Format, tokenizer: Any, *, seq_len: int, pack: bool, train_on_prompt: bool, source: str,
    template: Template = Template.AUTO, text_unit: TextUnit = TextUnit.DOCUMENT, directory: Path | None = None,
) -> Sequences:
    """Tokenize every row and cut the result into sequences of at most `seq_len` tokens.

    Without packing, each example is one sequence, truncated to `seq_len`, but for text: a document longer than
    `seq_len` continues in the next sequences, so no text is lost (and no two documents share a sequence). With
    packing, examples are concatenated and cut into full windows; windows with nothing to predict are dropped.
    Text examples (and prompt/completion and Alpaca ones) are each wrapped in BOS ... EOS; a chat template places
    its own special tokens.

    Args:
        template: how instruction rows are rendered (auto: the tokenizer's chat template when it has one).
        text_unit: what one example of a text row is: the whole text, each of its lines, or each paragraph.
        directory: where the sequences are written (cli/token_cache.py's entry being built); None keeps them in
            memory. The rows are tokenized with `datasets.map` either way (cli/sequences.py).

    Raises:
        FinetuneError: a row with a bad field (named with its row number), a prompt that leaves no room for the
            completion within `seq_len`, or a --template that does not apply.
    """
    chat_rendered = fmt is Format.CHAT or _renders_with_chat_template(fmt, template, tokenizer, source)
    encode = functools.partial(_encode_rows, fmt=fmt, tokenizer=tokenizer, train_on_prompt=train_on_prompt,
                               source=source, chat_rendered=chat_rendered, text_unit=text_unit)
    cut = Cut.PACK if pack else Cut.SPLIT if fmt is Format.TEXT else Cut.TRUNCATE
    return build_sequences(rows, encode, seq_len=seq_len, cut=cut, source=source, directory=directory)


def _encode_rows(rows: list[dict[str, Any]], first: int, *, fmt: Format, tokenizer: Any, train_on_prompt: bool,
                 source: str, chat_rendered: bool, text_unit: TextUnit) -> list[tuple[int, list[int], list[int]]]:
    """(row number, ids, labels) of each example of `rows`, numbered from `first`: what `build_sequences` calls on
    each batch of rows (in `datasets.map`)."""
    numbered = [(number, pieces) for number, row in enumerate(rows, start=first)
                for pieces in _examples(row, fmt, tokenizer, train_on_prompt, source, number, chat_rendered,
                                        text_unit)]
    encoded = _encode([pieces for _, pieces in numbered], tokenizer, with_bos_eos=not chat_rendered)
    return [(number, *example) for (number, _), example in zip(numbered, encoded) if example is not None]


def _renders_with_chat_template(fmt: Format, template: Template, tokenizer: Any, source: str) -> bool:
    """Whether instruction rows go through the tokenizer's chat template (--template).

    Raises:
        FinetuneError: --template chat without a chat template, or a --template for rows that are not instructions.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template is not Template.AUTO and fmt is not Format.INSTRUCTION:
        remap = " (to render prompt/completion rows as instructions: --columns instruction=prompt,output=completion)" \
            if fmt is Format.PROMPT_COMPLETION else ""
        raise FinetuneError(f"--template {template.value} is how instruction rows (instruction, input, output) become "
                            f"text, and {source} is {fmt.value}; drop --template{remap}")
    if template is Template.CHAT and not has_template:
        raise FinetuneError("--template chat renders instruction rows with the tokenizer's chat template, and this "
                            "tokenizer has none; pass --template alpaca, or a --tokenizer that has one")
    return fmt is Format.INSTRUCTION and (template is Template.CHAT or (template is Template.AUTO and has_template))


def _examples(row: dict[str, Any], fmt: Format, tokenizer: Any, train_on_prompt: bool, source: str, number: int,
              chat_rendered: bool, text_unit: TextUnit) -> list[list[tuple[str, bool]]]:
    """The examples of a row, each as (text, trainable) pieces: one per row, but for text one per --text-unit."""
    if fmt is not Format.TEXT:
        return [_segments(row, fmt, tokenizer, train_on_prompt, source, number, chat_rendered)]
    text = row.get("text")
    if not isinstance(text, str):
        raise FinetuneError(f"{source} row {number}: field 'text' should be a string, got {text!r:.60}")
    return [[(unit, True)] for unit in _units(text, text_unit)] or [[]]


def _units(text: str, unit: TextUnit) -> list[str]:
    """The examples in a text: itself (its newlines kept), its lines, or its paragraphs (split at blank lines);
    none that is only whitespace."""
    if unit is TextUnit.DOCUMENT:
        return [text] if text.strip() else []
    text = text.replace("\r\n", "\n")
    pieces = text.split("\n") if unit is TextUnit.LINE else re.split(r"\n[ \t]*\n", text)
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def _segments(row: dict[str, Any], fmt: Format, tokenizer: Any, train_on_prompt: bool, source: str,
              number: int, chat_rendered: bool = False) -> list[tuple[str, bool]]:
    """A row that is not text as (text, trainable) pieces. `chat_rendered`: instruction rows go through the chat
    template."""
    def field(name: str, *, required: bool = True) -> str:
        value = row.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise FinetuneError(f"{source} row {number}: field {name!r} should be a string, got {value!r:.60}")
        return value

    if fmt is Format.CHAT:
        column = "messages" if row.get("messages") is not None else "conversations"
        pieces = _chat_segments(row.get(column), tokenizer, source, number, column)
    elif fmt is Format.INSTRUCTION and chat_rendered:
        extra = field("input", required=False)
        turns = [{"role": "user", "content": field("instruction") + (f"\n\n{extra}" if extra else "")},
                 {"role": "assistant", "content": field("output")}]
        pieces = _chat_segments(turns, tokenizer, source, number, "messages")
    elif fmt is Format.INSTRUCTION:
        extra = field("input", required=False)
        prompt = _INSTRUCTION_PROMPT.format(instruction=field("instruction"),
                                            input=f"### Input:\n{extra}\n\n" if extra else "")
        pieces = [(prompt, False), (field("output"), True)]
    else:
        pieces = [(field("prompt"), False), (field("completion"), True)]
    return [(text, trainable or train_on_prompt) for text, trainable in pieces]


def _chat_turns(messages: Any, source: str, number: int, column: str) -> list[dict[str, str]]:
    """`messages` as [{role, content}]: each message is {role, content} or ShareGPT's {from, value}, whose
    human, gpt and system are the roles user, assistant and system.

    Raises:
        FinetuneError: not a list of such messages, or a role that is not a chat role (a template renders any
            role, so a typo would silently become prompt text).
    """
    shape = (f"{source} row {number}: {column!r} should be a list of messages, each {{role, content}} or ShareGPT's "
             "{from, value}, as strings")
    if not isinstance(messages, list):
        raise FinetuneError(shape)
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            raise FinetuneError(shape)
        if isinstance(message.get("role"), str) and isinstance(message.get("content"), str):
            role, key, content = message["role"], "role", message["content"]
        elif isinstance(message.get("from"), str) and isinstance(message.get("value"), str):
            role, key, content = _SHAREGPT_ROLES.get(message["from"], message["from"]), "from", message["value"]
        else:
            raise FinetuneError(shape)
        if role not in CHAT_ROLES:
            raise FinetuneError(f"{source} row {number}: a message has {key} {message[key]!r}; use one of "
                                f"{', '.join(CHAT_ROLES)} (in ShareGPT's from: {', '.join(_SHAREGPT_ROLES)}; only "
                                "assistant turns are trained on)")
        turns.append({"role": role, "content": content})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise FinetuneError(f"{source} row {number}: no message with role 'assistant' (ShareGPT: gpt) to train on")
    return turns


def _chat_segments(messages: Any, tokenizer: Any, source: str, number: int,
                   column: str = "messages") -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; each assistant turn is trainable, the rest is prompt.

    The turns are found by rendering growing prefixes of the conversation, which works for any template
    whose rendering of a prefix is a prefix of the whole (true of the common ones, and checked).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(
            "the chat format needs the tokenizer's chat template, and this tokenizer has none; add `chat_template` "
            "to its tokenizer_config.json or pass --tokenizer with one"
        )
    messages = _chat_turns(messages, source, number, column)

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
