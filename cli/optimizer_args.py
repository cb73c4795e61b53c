"""`--optimizer-args`: the settings of the --optimizer's class beyond --lr and --weight-decay (GaLore's rank, FRUGAL's
density, MeZO's eps, AdamW8bit's min_8bit_size), as NAME=VALUE pairs, e.g. `rank=64,update_proj_gap=200`.

The names are the keyword arguments of the optimizer's own constructor (`optim.GaLore(rank=...)`), read from its
signature, so a new setting there is reachable here with no change. Values are read as literals: 64 is an int,
1e-6 a float, true a bool, anything else a string; a tuple is written in brackets, `betas=(0.9,0.95)`. The checks
are the constructor's own (it raises for a bad range), run once when the options are read, before anything is
written. The settings that flags of their own give (--lr, --weight-decay; MeZO's --seed and --storage-dtype) are
refused here, with the flag named, so that one value has one place.
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
import inspect
import typing
from typing import Any

__all__ = ["FLAG_SETTINGS", "format_optimizer_args", "optimizer_class", "optimizer_kwargs", "optimizer_settings",
           "parse_optimizer_args"]

_CLASSES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "galore": "GaLore", "frugal": "Frugal", "mezo": "MeZO"}
"""--optimizer's values and the `optim` class each names."""

FLAG_SETTINGS = {"lr": "--lr", "weight_decay": "--weight-decay"}
"""Constructor arguments every optimizer takes from a flag of its own (cli/engine_options.py passes them)."""
_MEZO_FLAG_SETTINGS = {**FLAG_SETTINGS, "seed": "--seed", "storage_dtype": "--storage-dtype"}


def parse_optimizer_args(text: str | None) -> dict[str, Any]:
    """`rank=64,betas=(0.9,0.95)` as {"rank": 64, "betas": (0.9, 0.95)}; commas inside brackets stay in the value.

    Raises:
        ValueError: a pair that is not NAME=VALUE, or a NAME given twice; the message names the pair.
    """
    values: dict[str, Any] = {}
    for pair in filter(None, (piece.strip() for piece in _split(text or ""))):
        name, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not name.isidentifier() or not value:
            raise ValueError(f"--optimizer-args {pair!r} is not NAME=VALUE; give pairs such as "
                             "rank=64,update_proj_gap=200")
        if name in values:
            raise ValueError(f"--optimizer-args: {name} is given twice; keep one")
        values[name] = _literal(value)
    return values


def format_optimizer_args(values: dict[str, Any]) -> str | None:
    """The text of `values` (a config file's mapping, or parsed pairs), by name, that `parse_optimizer_args` reads
    back to the same values: what run-config.yaml saves, so a resumed run compares settings, not spellings."""
    return ",".join(f"{name}={_text(values[name])}" for name in sorted(values)) or None


def optimizer_settings(optimizer: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of `optimizer` (an --optimizer value) that --optimizer-args may set, in the
    signature's order."""
    signature = inspect.signature(optimizer_class(optimizer), eval_str=True)
    flags = _flag_settings(optimizer)
    return {name: parameter for name, parameter in signature.parameters.items() if name not in flags}


def optimizer_kwargs(optimizer: str, text: str | None) -> dict[str, Any]:
    """The keyword arguments --optimizer-args `text` gives `optimizer`'s constructor, checked by building it once.

    Raises:
        ValueError: a malformed pair, a name the optimizer does not take (with the closest one and the list of
            those it takes), a value of the wrong type, or the constructor's own error for a bad value; one line
            that starts with --optimizer-args and the pair.
    """
    values = parse_optimizer_args(text)
    settings, flags = optimizer_settings(optimizer), _flag_settings(optimizer)
    kwargs = {}
    for name, value in values.items():
        pair = f"--optimizer-args {name}={_text(value)}"
        if name in flags:
            raise ValueError(f"{pair}: {name} has a flag of its own; pass {flags[name]} {_text(value)} instead")
        if name not in settings:
            raise ValueError(f"{pair}: {_unknown(optimizer, name, settings)}")
        kwargs[name] = _checked(optimizer, name, value, settings[name].annotation, pair)
    try:
        optimizer_class(optimizer)(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--optimizer-args {format_optimizer_args(values)}: {' '.join(str(error).split())}") from None
    return kwargs


def optimizer_class(optimizer: str) -> type:
    from .. import optim  # here: torch comes with it, and the help and the option checks do without

    return getattr(optim, _CLASSES[optimizer])


def _flag_settings(optimizer: str) -> dict[str, str]:
    return _MEZO_FLAG_SETTINGS if optimizer == "mezo" else FLAG_SETTINGS


def _unknown(optimizer: str, name: str, settings: dict[str, inspect.Parameter]) -> str:
    """Why `name` is refused: the closest setting, whose setting it is if another optimizer's, and the list."""
    close = difflib.get_close_matches(name, list(settings), 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    owners = [other for other in _CLASSES if other != optimizer and name in optimizer_settings(other)]
    if owners and not close:
        hint = f" (it is a setting of {' and '.join(owners)}: pass --optimizer {owners[0]})"
    return f"{optimizer} has no setting {name!r}{hint}; its settings: {', '.join(settings) or 'none'}"


def _checked(optimizer: str, name: str, value: Any, annotation: Any, pair: str) -> Any:
    """`value` as the argument's annotation wants it (an int for a float is fine; a list is a tuple; one name for
    a collection of names is a collection of one), or ValueError naming the type. Ranges and Literal choices are
    left to the constructor, whose messages name them."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple or origin in (collections.abc.Collection, collections.abc.Sequence):
        items = (value,) if isinstance(value, str) and origin is not tuple else value
        item_types = args if origin is tuple and Ellipsis not in args else args[:1] * len(items)
        if isinstance(items, (tuple, list)) and len(items) == len(item_types) and all(
                _is(item, kind) for item, kind in zip(items, item_types)):
            return tuple(items)
        names = ",".join(_name(kind) for kind in args if kind is not Ellipsis)
        wanted = f"({names}{',...' if origin is not tuple else ''})"
        raise ValueError(f"{pair}: {optimizer}'s {name} takes {wanted}, not {_text(value)}")
    if annotation in (int, float, bool, str) and not _is(value, annotation):
        raise ValueError(f"{pair}: {optimizer}'s {name} takes {_article(annotation)}, not {_text(value)}")
    return value


def _is(value: Any, kind: Any) -> bool:
    """Whether `value` passes for `kind`: a bool is not a number here, and an int is a float."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _article(kind: type) -> str:
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}[kind]


def _split(text: str) -> list[str]:
    """`text` cut at the commas outside brackets."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == "," and depth == 0:
            pieces.append(text[start:index])
            start = index + 1
    return [*pieces, text[start:]]


def _literal(text: str) -> Any:
    """A value as typed: a bracketed tuple, true/false, a number or a quoted string (Python literals), else the
    text itself."""
    if text[:1] in "([" and text[-1:] in ")]":
        return tuple(_literal(item.strip()) for item in _split(text[1:-1]) if item.strip())
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str)) else text


def _text(value: Any) -> str:
    """`value` as `_literal` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(_text, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, str) and _literal(value) != value:
        return repr(value)
    return str(value)
