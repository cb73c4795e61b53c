"""The dataset formats, instruction templates and `--columns` names, apart from reading and tokenizing (cli/data.py),
so that the options can be checked (and `--help` printed) without numpy and the data libraries."""

from __future__ import annotations

import enum

__all__ = ["COLUMN_NAMES", "Format", "Template", "parse_columns"]


class Format(str, enum.Enum):
    """How a row becomes a prompt and a completion."""

    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    CHAT = "chat"


class Template(str, enum.Enum):
    """How an instruction row becomes text."""

    AUTO = "auto"  # the tokenizer's chat template when it has one, else alpaca
    CHAT = "chat"
    ALPACA = "alpaca"


COLUMN_NAMES = ("text", "prompt", "completion", "instruction", "input", "output", "messages")
"""The field names `--columns` maps the user's fields to."""


def parse_columns(text: str | None) -> dict[str, str]:
    """`--columns` (prompt=question,completion=answer) as {format field: the dataset's field}.

    Raises:
        ValueError: a pair that is not NAME=COLUMN, a NAME no format reads, or a NAME or COLUMN given twice; the
            message names the pair.
    """
    mapping: dict[str, str] = {}
    for pair in filter(None, (piece.strip() for piece in (text or "").split(","))):
        name, equals, column = (part.strip() for part in pair.partition("="))
        if not equals or not name or not column:
            raise ValueError(f"{pair!r} is not NAME=COLUMN")
        if name not in COLUMN_NAMES:
            raise ValueError(f"{name!r} is not a field of any format (those are {', '.join(COLUMN_NAMES)})")
        if name in mapping or column in mapping.values():
            raise ValueError(f"{name if name in mapping else column!r} is mapped twice")
        mapping[name] = column
    return mapping
