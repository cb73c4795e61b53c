"""Where a dataset's rows come from: a file, a directory, or a `datasets` hub name, read with `datasets` into
Arrow tables, one part per file type. What the rows mean (their format) is cli/data.py's concern.

A directory is read the way its layout says:

- written by `save_to_disk`: by `datasets.load_from_disk`, `--split` choosing among its splits;
- with a dataset card whose YAML header lists `configs` (README.md, as `hf download --repo-type dataset` leaves
  it): `--dataset-config` chooses a config (the card's default, or its only one, without it) and `--split` one of
  the config's `data_files` splits;
- otherwise, its .jsonl/.json/.csv/.parquet/.txt/.md files, of any mix of types, in any subfolder. When every
  file's path names a split (train.jsonl and test.jsonl, data/train-00000-of-00001.parquet, a train/ folder), by
  the words the hub uses (train, training; validation, valid, dev, val; test, testing, eval, evaluation), `--split`
  picks those files; otherwise all of them are the one split, train. The top-level README.md and dataset_info.json
  are never data.

However the files are chosen, they are read the same way: a .txt/.md file becomes rows by `--text-unit` (the whole
file, newlines kept; its lines; or its paragraphs), and problems are reported with the file and line they are in,
because in a 100k-line file "malformed JSON" alone does not help anyone.

A hub name is tried only where the hub can be reached: without a network the hub client is put in offline mode
first, so that a dataset in the local cache still loads and any other fails at once, not after half a minute of
retries.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import FinetuneError, one_line

__all__ = ["Part", "TextUnit", "read_parts"]

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}

_NOT_DATA = {"README.md", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}  # its card and metadata
_SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}  # as the hub infers splits from file names (datasets.data_files.SPLIT_KEYWORDS)
_SHARD = re.compile(r"data/(\w+)-\d{5}-of-\d{5}[.\w]*")  # the hub's sharded layout, any split name
_PROBE_SECONDS = 3.0  # a reachable hub answers a TCP connect well within this
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class TextUnit(str, enum.Enum):
    """What one example of a .txt/.md file or a text field is."""

    DOCUMENT = "document"
    LINE = "line"
    PARAGRAPH = "paragraph"


@dataclass
class Part:
    """Rows read together (the files of one type, or a whole hub dataset), and how to name them in a message."""

    rows: Any  # a datasets.Dataset
    where: str


def read_parts(source: str, *, label: str = "dataset", config: str | None = None, split: str = "train",
               text_unit: TextUnit = TextUnit.DOCUMENT, split_flag: str = "--split") -> list[Part]:
    """The rows of `source`'s `split`, one part per file type (one part for a hub dataset).

    Args:
        source: a file, a directory, or a hub name.
        label: how messages name the source ("dataset", "--val-file").
        config: the dataset's subset (`--dataset-config`), for hub names and directories with a card.
        split: the split to read; a single file is split train.
        text_unit: what one row of a .txt/.md file is.
        split_flag: the option that chose `split`, named in messages.

    Raises:
        FinetuneError: missing path, no data files, an unreadable, non-UTF-8 or malformed file (with its line), an
            unknown config or split (listing those there are), or a hub name that cannot be loaded.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its failure logs would repeat our one-line error
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix in _BUILDERS or source.startswith((".", "/", "~")):
            raise FinetuneError(f"{label} {source} does not exist; check the path")
        return [Part(_load_hub(datasets, source, label, config, split, text_unit, split_flag), source)]
    saved = path.is_dir() and _saved_to_disk(path)
    configs = _card_configs(path, label) if path.is_dir() and not saved else None
    if config is not None and configs is None:
        raise FinetuneError(f"--dataset-config {config}: {label} {source} has no configs (only a hub dataset or a "
                            "directory whose README.md dataset card lists `configs` has them); drop --dataset-config")
    if saved:
        return [Part(_load_saved(datasets, path, label, split, split_flag), str(path))]
    if configs is not None:
        files = _config_files(path, configs, label, config, split, split_flag)
    else:
        files = _split_files(path, label, split, split_flag) if path.is_dir() else _single_file(path, label, split,
                                                                                                split_flag)
    return _load_files(datasets, files, path, label, text_unit)


def _single_file(path: Path, label: str, split: str, split_flag: str) -> list[Path]:
    if path.suffix not in _BUILDERS:
        raise FinetuneError(f"{label} {path}: unsupported file type {path.suffix or '(none)'!r}; use "
                            f"{', '.join(_BUILDERS)}")
    if split != "train":
        raise FinetuneError(f"{split_flag} {split}: {label} {path} is one file, which is split train; pass the other "
                            "split's file with --val-file, or put split-named files in a directory")
    return [path]


def _data_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.suffix in _BUILDERS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(
            directory).parts) and not (p.parent == directory and p.name in _NOT_DATA)
    )


def _split_files(directory: Path, label: str, split: str, split_flag: str) -> list[Path]:
    """The files of `split`: those named for it when every file names a split, else (split train) all of them."""
    files = _data_files(directory)
    if not files:
        raise FinetuneError(f"{label} directory {directory} has no {', '.join(_BUILDERS)} files")
    splits = {file: _split_of(file.relative_to(directory)) for file in files}
    if None in splits.values():  # not every file names a split: all of them are the data
        if split != "train":
            unnamed = next(file for file, name in splits.items() if name is None)
            raise FinetuneError(f"{split_flag} {split}: {label} {directory} has no named splits ({unnamed} names none, "
                                "so all its files are split train); name every file for its split (train.jsonl, "
                                "test.jsonl) or pass the other split with --val-file")
        return files
    names: dict[str, list[Path]] = {}
    for file, name in splits.items():
        names.setdefault(name, []).append(file)
    if split not in names:
        raise FinetuneError(f"{split_flag} {split}: {label} {directory} has no split {split!r} (its splits, from its "
                            f"file names: {', '.join(names)}); pass one of them to {split_flag}")
    return names[split]


def _split_of(relative: Path) -> str | None:
    """The split a file's path names, or None (no split word, or words of two splits)."""
    posix = relative.as_posix()
    shard = _SHARD.fullmatch(posix)
    if shard:
        return shard[1]
    words = set(re.split(r"[-._ /0-9]+", str(relative.with_suffix("")).lower()))
    found = [name for name, keywords in _SPLIT_WORDS.items() if words & set(keywords)]
    return found[0] if len(found) == 1 else None


def _card_configs(directory: Path, label: str) -> dict[str, dict[str, Any]] | None:
    """The `configs` of README.md's YAML header (a dataset card), by name; None without them.

    Read here rather than by `datasets`, whose cache of a local directory's config does not notice edited files,
    and so that every file type and --text-unit work as they do in any directory.

    Raises:
        FinetuneError: a `configs` header that is not a list of configs.
    """
    card = directory / "README.md"
    if not card.is_file():
        return None
    match = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(\n|$)", card.read_text(errors="replace"), re.DOTALL)
    if not match:
        return None
    import yaml

    try:
        header = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return None  # not a dataset card: notes that happen to start with ---
    if not isinstance(header, dict) or "configs" not in header:
        return None
    configs = header["configs"]
    if not isinstance(configs, list) or not all(isinstance(entry, dict) for entry in configs):
        raise FinetuneError(f"{label} {card}: its `configs` should be a list of {{config_name, data_files}}; fix the "
                            "dataset card")
    return {str(entry.get("config_name", "default")): entry for entry in configs}


def _config_files(directory: Path, configs: dict[str, dict[str, Any]], label: str, config: str | None, split: str,
                  split_flag: str) -> list[Path]:
    """The files of one config's split, as a dataset card's `data_files` (patterns relative to the directory, one
    list, or one per split) or `data_dir` name them.

    Raises:
        FinetuneError: an unknown config, or none chosen among several; an unknown split; a split with no files.
    """
    where = f"{label} {directory}"
    if config is None:
        defaults = [name for name, entry in configs.items() if entry.get("default")]
        if len(defaults) != 1 and len(configs) > 1:
            raise FinetuneError(f"{where} has several configs ({', '.join(configs)}); choose one with --dataset-config")
        config = defaults[0] if defaults else next(iter(configs))
    if config not in configs:
        raise FinetuneError(f"--dataset-config {config}: {where} has no config {config!r} (its configs: "
                            f"{', '.join(configs)})")
    entry = configs[config]
    base = directory / str(entry.get("data_dir") or "")
    data_files = entry.get("data_files")
    if data_files is None:  # the files of data_dir, split by their names
        return _split_files(base, label, split, split_flag)
    if isinstance(data_files, (str, list)) and all(isinstance(item, str) for item in _listed(data_files)):
        splits = {"train": _listed(data_files)}
    else:
        splits = {str(item.get("split", "train")): _listed(item.get("path", [])) for item in _listed(data_files)
                  if isinstance(item, dict)}
    if split not in splits:
        raise FinetuneError(f"{split_flag} {split}: {where} (config {config}) has no split {split!r} (its splits: "
                            f"{', '.join(splits)}); pass one of them to {split_flag}")
    files = sorted({file for pattern in splits[split] for file in base.glob(str(pattern))
                    if file.is_file() and file.suffix in _BUILDERS})
    if not files:
        raise FinetuneError(f"{where}: config {config} split {split} names {', '.join(map(str, splits[split]))}, which "
                            f"matches no {', '.join(_BUILDERS)} file; fix the dataset card or add the files")
    return files


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _saved_to_disk(directory: Path) -> bool:
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_files(datasets: Any, files: list[Path], path: Path, label: str, text_unit: TextUnit) -> list[Part]:
    for file in files:
        _check_readable(file, label)
    if all(f.stat().st_size == 0 for f in files):
        raise FinetuneError(f"{label} {path} is empty; add examples or point at another file")
    parts = []
    for builder in sorted({_BUILDERS[f.suffix] for f in files}):
        group = [str(f) for f in files if _BUILDERS[f.suffix] == builder]
        try:
            rows = _load_group(datasets, builder, group, text_unit)
        except FinetuneError:
            if len(group) == 1:
                raise
            # Not a bad line (that would be named): files of one type with different fields, each read on its own
            # and combined by their format's fields (cli/data.py).
            parts += [Part(_load_group(datasets, builder, [file], text_unit), file) for file in group]
            continue
        parts.append(Part(rows, group[0] if len(group) == 1 else f"{group[0]} (and {len(group) - 1} more {builder} "
                                                                 "files)"))
    return parts


def _load_group(datasets: Any, builder: str, files: list[str], text_unit: TextUnit) -> Any:
    """Files of one type, read together by `datasets`' builder for them.

    Raises:
        FinetuneError: the first line that is not UTF-8 or not valid JSON (with file and line), else the parser's
            message.
    """
    options = {"sample_by": text_unit.value} if builder == "text" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as error:  # datasets wraps parser errors in its own types; find the line ourselves
        location = next(filter(None, (_first_non_utf8(Path(f)) or _first_bad_json(Path(f)) for f in files)), None)
        if location:
            raise FinetuneError(location) from None
        cause = error.__cause__ or error.__context__ or error
        raise FinetuneError(f"cannot read {', '.join(files)}: {type(cause).__name__}: "
                            f"{one_line(str(cause))[:300]}") from None
    _check_utf8(rows, files)
    return rows


def _load_hub(datasets: Any, name: str, label: str, config: str | None, split: str, text_unit: TextUnit,
              split_flag: str) -> Any:
    """A hub dataset, loaded by `datasets` (from its cache when offline)."""
    offline = _offline_without_network(datasets)
    try:
        builder = datasets.load_dataset_builder(name, config)
        options = {"sample_by": text_unit.value} if builder.name == "text" else {}
        return datasets.load_dataset(name, config, split=split, **options)
    except ValueError as error:  # datasets' words for an unknown config or split; ours name the option
        message = one_line(str(error))
        raise FinetuneError(_describe_choice(message, label, name, config, split, split_flag) or
                            f"cannot load {label} {name}: {message[:300]}") from None
    except Exception as error:  # offline, unknown name, no access: all end the same way for the user
        reason = f"{offline}; not in the datasets cache either" if offline else one_line(str(error))[:200]
        subset = f" (config {config})" if config else ""
        raise FinetuneError(
            f"{label} {name}{subset} is not a local path and could not be loaded from the hub ({reason}); where "
            f"the network allows, run `hf download {name} --repo-type dataset --local-dir ./{name.split('/')[-1]}` "
            f"and pass that directory"
        ) from None


def _describe_choice(message: str, label: str, name: str, config: str | None, split: str,
                     split_flag: str) -> str | None:
    """Our message for datasets' "Config name is missing", "BuilderConfig not found" and "Unknown split"."""
    listed = re.search(r"\[([^\]]*)\]", message)
    choices = ", ".join(re.findall(r"'([^']*)'", listed[1])) if listed else "?"
    if message.startswith("Config name is missing"):
        return f"{label} {name} has several configs ({choices}); choose one with --dataset-config"
    if message.startswith("BuilderConfig"):
        return f"--dataset-config {config}: {label} {name} has no config {config!r} (its configs: {choices})"
    if message.startswith("Unknown split"):
        return (f"{split_flag} {split}: {label} {name} has no split {split!r} (its splits: {choices}); pass one of "
                f"them to {split_flag}")
    return None


def _load_saved(datasets: Any, directory: Path, label: str, split: str, split_flag: str) -> Any:
    """A `save_to_disk` directory: a DatasetDict's split, or a single Dataset (split train)."""
    saved = datasets.load_from_disk(str(directory))
    if isinstance(saved, datasets.Dataset):
        names = {"train": saved}
    else:
        names = dict(saved)
    if split not in names:
        raise FinetuneError(f"{split_flag} {split}: {label} {directory} has no split {split!r} (its splits: "
                            f"{', '.join(names)}); pass one of them to {split_flag}")
    return names[split]


def _offline_without_network(datasets: Any) -> str | None:
    """Put the hub client in offline mode when the hub cannot be reached, so that a cached dataset still loads and
    any other fails at once (the client would retry for about 25 s). Returns why it is offline, or None.

    A configured proxy may reach the hub where a direct connection cannot, so with one nothing is probed.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXIES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
        return None
    except OSError as error:
        constants.HF_HUB_OFFLINE = True  # both libraries read these flags at each request
        datasets.config.HF_HUB_OFFLINE = True
        return f"no network: cannot connect to {host}:{port}, {error.strerror or type(error).__name__}"


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
