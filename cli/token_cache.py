"""The token cache: a run's data tokenized once, kept on disk for the runs after it.

`finetune run` tokenizes its data into sequences (cli/sequences.py) inside this cache, so a second run of the same
command, a `--resume`, or `run` after `run --dry-run`, memory-maps the sequences the first one wrote instead of
tokenizing again. An entry is keyed by everything its tokens depend on:

- the data: each file of DATASET (and --val-file) by path, size and modification time; a hub dataset by its
  name and the files `datasets` keeps it in;
- the tokenizer, by content (its serialized state, chat template and special tokens), not by path: a resumed run
  loads it from the checkpoint;
- every RunConfig field in `TOKEN_SETTINGS`, the detected format, and which part (train or val) it is;
- the code that makes tokens (the source of cli/data.py, cli/sources.py, cli/sequences.py) and the tokenizers and
  transformers versions, so an upgrade never reads an old entry.

Layout: ROOT/tokens/KEY/ holds sequences.arrow and meta.json, where ROOT is $FINETUNE_CACHE_DIR or
~/.cache/finetune (as for the planner's rates). An entry is written under ROOT/tokens/.KEY.PID.RANDOM.tmp and
renamed into place whole, so a reader sees a complete entry or none, and two runs tokenizing the same data at once
both finish (the second rename loses, and that run reads the first one's entry). A cache that cannot be written (a
read-only or full disk) is skipped with a note: the run tokenizes in memory, as before the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import RunConfig
from .errors import one_line
from .sequences import META_FILE, Sequences

__all__ = ["TOKEN_SETTINGS", "TokenCache", "default_root"]

TOKEN_SETTINGS = ("format", "columns", "template", "text_unit", "dataset_config", "split", "val_split",
                  "val_fraction", "seed", "train_on_prompt", "seq_len", "pack")
"""The RunConfig fields that change the tokens, in the key of every entry. A new option that changes what is
tokenized, or how the tokens are cut into sequences, goes here (tests/cli/test_token_cache.py fails until each
field is either listed here or named as not changing the tokens)."""

_VERSION = 1  # of the entry's layout
_CODE = ("data.py", "sources.py", "sequences.py")  # cli modules whose source decides the tokens


def default_root() -> Path:
    """$FINETUNE_CACHE_DIR, else ~/.cache/finetune: the root of finetune's caches (the CLI's, read here)."""
    return Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune"))


class TokenCache:
    """The entries of one run's data under `root` (None: no cache, everything is tokenized in memory)."""

    def __init__(self, root: Path | None, config: RunConfig, tokenizer: Any) -> None:
        import tokenizers
        import transformers

        self.root = root / "tokens" if root is not None else None
        self.config = config
        settings = config.to_dict()
        self.common = {
            "version": _VERSION,
            "settings": {name: settings[name] for name in TOKEN_SETTINGS},
            "tokenizer": _tokenizer_digest(tokenizer),
            "code": _code_digest(),
            "libraries": [tokenizers.__version__, transformers.__version__],
        }

    def key(self, part: str, source: str, fmt: str, rows: Any) -> str | None:
        """The entry's name: a hash of `self.common` and this part's data; None for data that no file identifies
        (rows held only in memory), which is not cached."""
        stamp = _data_stamp(source, rows)
        if stamp is None:
            return None
        described = {**self.common, "part": part, "format": fmt, "data": stamp}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def sequences(self, part: str, source: str, fmt: str, rows: Any,
                  build: Callable[[Path | None], Sequences]) -> Sequences:
        """The sequences of `part` (train or val, read from `source` as `rows`, in format `fmt`): from the cache, or
        `build(directory)` writes them into it now (`build(None)`: in memory, without a cache).

        Raises:
            FinetuneError: from `build` (bad data); nothing is left in the cache then.
        """
        key = self.key(part, source, fmt, rows) if self.root is not None else None
        if self.root is None or key is None:
            return build(None)
        entry = self.root / key
        cached = _open(entry)
        if cached is not None:
            return cached
        building = self.root / f".{key}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(self.root)
            building.mkdir()
            sequences = build(building)
        except OSError as error:  # the cache's disk, not the data: that was read before
            shutil.rmtree(building, ignore_errors=True)
            Console(stderr=True).print(f"the token cache {self.root} cannot be written ({one_line(str(error))}); "
                                       "tokenizing in memory", highlight=False, soft_wrap=True)
            return build(None)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        try:
            building.rename(entry)  # the file stays mapped: a rename keeps the inode
        except OSError:  # another run stored the same entry first: use that one
            opened = _open(entry)
            if opened is None:
                return sequences  # left in `building`, removed as abandoned once this process has ended
            shutil.rmtree(building, ignore_errors=True)
            return opened
        return sequences


def _open(entry: Path) -> Sequences | None:
    """The entry's sequences, or None when there is none; a damaged entry is removed (and then rebuilt)."""
    if not (entry / META_FILE).exists():
        return None
    try:
        sequences = Sequences.open(entry)
    except (OSError, ValueError, KeyError):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        os.utime(entry / META_FILE)  # its last use, for whoever clears old entries
    except OSError:
        pass
    return sequences


def _remove_abandoned(root: Path) -> None:
    """Entries being built by processes that no longer run (killed while tokenizing)."""
    for path in root.glob(".*.tmp"):
        try:
            pid = int(path.name.split(".")[2])  # .KEY.PID.RANDOM.tmp
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


def _data_stamp(source: str, rows: Any) -> list[Any] | None:
    """What identifies the data: each local file by resolved path, size and modification time (a directory's files,
    hidden ones aside), or a hub dataset by its name and the files `datasets` holds it in (None without any)."""
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                    p.relative_to(path).parts))
        return [str(path.resolve())] + [[str(f.relative_to(path)) if f != path else "", f.stat().st_size,
                                         f.stat().st_mtime_ns] for f in files]
    cached = [f["filename"] for f in getattr(rows, "cache_files", [])]
    if not cached:
        return None
    return ["hub", source] + [[name, os.stat(name).st_size, os.stat(name).st_mtime_ns] for name in sorted(cached)]


def _tokenizer_digest(tokenizer: Any) -> str:
    """The tokenizer by content: a fast tokenizer's whole serialized state (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens), else its vocabulary and settings; with the chat template and BOS/EOS ids that
    cli/data.py adds."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.init_kwargs], default=str)
    described = [type(tokenizer).__name__, state, getattr(tokenizer, "chat_template", None),
                 tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def _code_digest() -> str:
    digest = hashlib.sha256()
    for name in _CODE:
        path = Path(__file__).with_name(name)
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()
