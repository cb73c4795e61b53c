"""Training sequences: examples tokenized with `datasets.map` and cut into sequences of at most seq_len tokens,
held in an Arrow table rather than in Python lists.

`build_sequences` runs the tokenizing function (cli/data.py's, per batch of rows) through `datasets.map`, in
several processes when the rows are large, then cuts the examples into sequences in one streaming pass, and
writes them as an Arrow file when it is given a directory (cli/token_cache.py keeps that directory between runs).
`Sequences.open` memory-maps that file: a sequence's tokens are read from the page cache when a batch needs them,
so a dataset larger than RAM trains, and a second run reads what the first one wrote instead of tokenizing again.

The examples become sequences in one of three ways (`Cut`): each truncated to seq_len (prompt/completion,
instruction, chat), each cut into consecutive sequences of seq_len so that no text is lost (text), or all of them
concatenated and cut into full sequences (`--pack`). A packed sequence records where each of its examples starts
(`starts`), so that batches keep them apart (cli/packed_attention.py).

Note [Packed boundaries]: in a packed sequence the label of each example's first token is IGNORE. The loss at
position t is the prediction of token t+1, so the last token of one example would otherwise be trained to predict
the first token of the next, a prediction that depends on the order of the data. Unpacked, nothing predicts an
example's first token either, which is what makes a packed batch's per-example losses equal the unpacked ones.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FinetuneError

__all__ = ["IGNORE", "Cut", "Sequences", "build_sequences"]

IGNORE = -100  # the label transformers' loss skips

SEQUENCES_FILE, META_FILE = "sequences.arrow", "meta.json"
_WRITE_BATCH = 1024  # sequences per Arrow record batch
_MAP_BATCH = 1000  # rows per call of the tokenizing function
BYTES_PER_PROCESS = 16 * 2**20  # rows of more than this are tokenized in several processes

Encode = Callable[[list[dict[str, Any]], int], list[tuple[int, list[int], list[int]]]]
"""A batch of rows, and the number (from 1) of its first -> (row number, ids, labels) of each of their examples."""


class Cut(str, enum.Enum):
    """How examples become sequences of at most seq_len tokens."""

    TRUNCATE = "truncate"  # one sequence per example, its first seq_len tokens
    SPLIT = "split"  # one example in consecutive sequences of seq_len: nothing is lost, no two share a sequence
    PACK = "pack"  # every example concatenated and cut into full sequences; `starts` says where each begins


class Sequences:
    """Token ids and labels, one row per training sequence, in an Arrow table (in memory, or memory-mapped from a
    file that `build_sequences` wrote). Packed sequences also hold `starts`: where each example in them begins.

    `ids`, `labels` and `starts` are read as lists of lists (`sequences.ids[3]`); `arrays` gives one sequence's
    numpy views without a copy, which is what batches use.
    """

    def __init__(self, ids: list[list[int]] | None = None, labels: list[list[int]] | None = None,
                 starts: list[list[int]] | None = None, *, table: Any = None, fingerprint: str | None = None,
                 max_id: int | None = None) -> None:
        """From lists (`ids`, `labels`, and `starts` for packed sequences), or over a pyarrow `table` with the
        columns input_ids, labels (and starts), list<int32> each, whose fingerprint and largest id may be known."""
        import pyarrow as pa

        if table is None:
            column = pa.list_(pa.int32())
            arrays = {"input_ids": pa.array(ids, column), "labels": pa.array(labels, column)}
            if starts is not None:
                arrays["starts"] = pa.array(starts, column)
            table = pa.table(arrays)
        self.table = table
        self.packed = "starts" in table.column_names
        # Per record batch: numpy views of each list column's offsets and values (no copy: they are the Arrow
        # buffers, pages of the memory-mapped file). Sequence i of a batch is values[offsets[i]:offsets[i + 1]].
        batches = table.to_batches()
        self._views = [{name: _list_view(batch.column(name)) for name in table.column_names} for batch in batches]
        self._bounds = np.cumsum([0] + [batch.num_rows for batch in batches])
        self._fingerprint, self._max_id = fingerprint, max_id

    @classmethod
    def open(cls, directory: Path) -> Sequences:
        """The sequences `build_sequences` wrote into `directory`, memory-mapped (nothing is read until used).

        Raises:
            OSError, ValueError: the files are missing or damaged (pyarrow.ArrowInvalid is a ValueError).
        """
        import pyarrow as pa

        meta = json.loads((directory / META_FILE).read_text())
        table = pa.ipc.open_file(pa.memory_map(str(directory / SEQUENCES_FILE), "r")).read_all()
        if table.num_rows != meta["count"]:
            raise ValueError(f"{directory / SEQUENCES_FILE} holds {table.num_rows} sequences, not {meta['count']}")
        return cls(table=table, fingerprint=meta["fingerprint"], max_id=meta["max_id"])

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, labels, starts or None) of sequence `index`: int32 views into the table, not copies."""
        return self.values(index, "input_ids"), self.values(index, "labels"), \
            self.values(index, "starts") if self.packed else None

    def values(self, index: int, column: str) -> np.ndarray:
        """Sequence `index`'s list in `column` (input_ids, labels, starts): an int32 view, not a copy."""
        (start, end), values = self._locate(index, column)
        return values[start:end]

    def length(self, index: int) -> int:
        """Tokens in sequence `index`."""
        (start, end), _ = self._locate(index, "input_ids")
        return int(end - start)

    @property
    def ids(self) -> _Column:
        return _Column(self, "input_ids")

    @property
    def labels(self) -> _Column:
        return _Column(self, "labels")

    @property
    def starts(self) -> _Column | None:
        return _Column(self, "starts") if self.packed else None

    @property
    def max_id(self) -> int:
        """The largest token id (known from the file's meta, else computed once)."""
        if self._max_id is None:
            self._max_id = max(int(view["input_ids"][1].max(initial=0)) for view in self._views)
        return self._max_id

    def fingerprint(self) -> str:
        """A hash of every token and label. A resumed run compares it with the checkpoint's to prove that it
        sees the same data in the same order (known from the file's meta, else computed once)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for index in range(len(self)):
                ids, labels, _ = self.arrays(index)
                _update(digest, ids, labels)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _locate(self, index: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch = int(np.searchsorted(self._bounds, index, side="right")) - 1
        offsets, values = self._views[batch][name]
        row = index - int(self._bounds[batch])
        return offsets[row : row + 2], values


class _Column:
    """One column of `Sequences` read as a list of lists (what tests and small callers want)."""

    def __init__(self, sequences: Sequences, name: str) -> None:
        self.sequences, self.name = sequences, name

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.sequences.values(index, self.name).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (_Column, list)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal by value, as the lists it stands for


def _list_view(array: Any) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a pyarrow ListArray as numpy, without a copy."""
    return array.offsets.to_numpy(), array.values.to_numpy()


def _update(digest: Any, ids: np.ndarray, labels: np.ndarray) -> None:
    # int64, as the fingerprint was defined when sequences were Python lists (array("q", ...)): the same data
    # keeps the same fingerprint, so runs checkpointed before keep resuming.
    digest.update(ids.astype(np.int64).tobytes())
    digest.update(labels.astype(np.int64).tobytes())


# ------------------------------------------------------------------------------------------------ building


def build_sequences(rows: Any, encode: Encode, *, seq_len: int, cut: Cut, source: str,
                    directory: Path | None = None) -> Sequences:
    """Tokenize `rows` (a `datasets.Dataset`) with `encode` through `datasets.map` and cut the examples into
    sequences of at most `seq_len` tokens; sequences with nothing to predict are dropped.

    Args:
        encode: cli/data.py's tokenizing function; it is called on batches of rows, in other processes when the
            rows are large (so it must pickle).
        directory: where to write the sequences (an Arrow file and its meta) and the intermediate examples; None
            keeps everything in memory.

    Raises:
        FinetuneError: from `encode` (a bad row, named), no example at all, a prompt that leaves nothing to
            predict within `seq_len`, or nothing to train on.
    """
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"row": datasets.Value("int64"), "input_ids": datasets.List(datasets.Value("int32")),
                                  "labels": datasets.List(datasets.Value("int32"))})
    processes = min(os.cpu_count() or 1, max(1, rows.data.nbytes // BYTES_PER_PROCESS))
    where = {"keep_in_memory": True} if directory is None else \
        {"cache_file_name": str(directory / "examples" / "examples.arrow")}
    if directory is not None:
        (directory / "examples").mkdir(parents=True, exist_ok=True)
    examples = rows.map(_encode_batch, fn_kwargs={"encode": encode}, batched=True, batch_size=_MAP_BATCH,
                        with_indices=True, remove_columns=rows.column_names, features=features,
                        num_proc=processes if processes > 1 else None, load_from_cache_file=False,
                        new_fingerprint=os.urandom(8).hex(), **where)  # never reused: the cache is ours
    writer = _Writer(seq_len, cut, source, directory)
    for batch in examples.data.to_batches():
        writer.add(batch)
    sequences = writer.finish()
    del examples  # its file is only the intermediate of the sequences just written
    if directory is not None:
        for path in (directory / "examples").iterdir():
            path.unlink()
        (directory / "examples").rmdir()
    return sequences


def _encode_batch(batch: dict[str, list], indices: list[int], encode: Encode) -> dict[str, list]:
    """`datasets.map`'s function: the batch's rows as dicts to `encode`, its examples as columns."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    examples = encode(rows, indices[0] + 1) if rows else []
    return {"row": [number for number, _, _ in examples], "input_ids": [ids for _, ids, _ in examples],
            "labels": [labels for _, _, labels in examples]}


class _Writer:
    """Examples in, sequences out, one record batch of examples at a time (memory: a batch, not the dataset)."""

    def __init__(self, seq_len: int, cut: Cut, source: str, directory: Path | None) -> None:
        import pyarrow as pa

        self.seq_len, self.cut, self.source, self.directory = seq_len, cut, source, directory
        self.schema = pa.schema([(name, pa.list_(pa.int32()))
                                 for name in ("input_ids", "labels", *(("starts",) if cut is Cut.PACK else ()))])
        self.file = pa.ipc.new_file(str(directory / SEQUENCES_FILE), self.schema) if directory else None
        self.batches: list[Any] = []  # record batches kept in memory without a directory
        self.pending: list[tuple[np.ndarray, ...]] = []  # sequences not yet in a record batch
        self.digest, self.max_id, self.count, self.examples = hashlib.sha256(), 0, 0, 0
        self.too_long: list[tuple[int, int]] = []  # (row, prompt tokens) of examples with nothing within seq_len
        # --pack: tokens not yet in a full sequence, and where the examples among them start
        self.carry_ids = np.empty(0, np.int32)
        self.carry_labels = np.empty(0, np.int32)
        self.carry_starts = np.empty(0, np.int64)

    def add(self, batch: Any) -> None:
        """A record batch of examples: columns row, input_ids, labels."""
        if batch.num_rows == 0:
            return
        offsets, ids = _list_view(batch.column("input_ids"))
        _, labels = _list_view(batch.column("labels"))
        offsets = offsets.astype(np.int64)
        rows = batch.column("row").to_numpy()
        self.examples += batch.num_rows
        self._check_prompts_fit(offsets, labels, rows)
        if self.cut is Cut.PACK:
            self._pack(offsets, ids, labels)
            return
        for start, end in zip(offsets[:-1], offsets[1:]):
            last = end if self.cut is Cut.SPLIT else min(end, start + self.seq_len)
            for piece in range(start, last, self.seq_len):
                stop = min(piece + self.seq_len, last)
                self._emit(ids[piece:stop], labels[piece:stop])

    def _check_prompts_fit(self, offsets: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        """Each example must have something to predict (a label at index >= 1) within its first seq_len tokens."""
        target = labels != IGNORE
        target[offsets[:-1][offsets[:-1] < len(labels)]] = False  # index 0: nothing predicts it
        positions = np.flatnonzero(target)
        first = positions[np.minimum(np.searchsorted(positions, offsets[:-1]), len(positions) - 1)] \
            if len(positions) else np.full(len(rows), -1)
        has = (first >= offsets[:-1]) & (first < offsets[1:]) if len(positions) else np.zeros(len(rows), bool)
        prompt = first - offsets[:-1]
        for k in np.flatnonzero(has & (prompt >= self.seq_len)):
            self.too_long.append((int(rows[k]), int(prompt[k])))

    def _pack(self, offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        labels = labels[offsets[0] : offsets[-1]].copy()
        starts = offsets[:-1] - offsets[0]
        labels[starts[starts < len(labels)]] = IGNORE  # Note [Packed boundaries]
        base = len(self.carry_ids)
        stream_ids = np.concatenate([self.carry_ids, ids[offsets[0] : offsets[-1]]])
        stream_labels = np.concatenate([self.carry_labels, labels])
        stream_starts = np.concatenate([self.carry_starts, starts + base])
        full = len(stream_ids) // self.seq_len
        for w in range(full):
            self._emit_packed(stream_ids, stream_labels, stream_starts, w * self.seq_len, (w + 1) * self.seq_len)
        done = full * self.seq_len
        self.carry_ids, self.carry_labels = stream_ids[done:], stream_labels[done:]
        self.carry_starts = stream_starts[stream_starts >= done] - done

    def _emit_packed(self, ids: np.ndarray, labels: np.ndarray, starts: np.ndarray, begin: int, end: int) -> None:
        low, high = np.searchsorted(starts, [begin, end])  # starts are in order
        inside = starts[low:high] - begin
        # A sequence that begins inside an example (its tail, cut off by the previous sequence) starts one at 0.
        if len(inside) == 0 or inside[0] != 0:
            inside = np.concatenate([[0], inside])
        self._emit(ids[begin:end], labels[begin:end], inside.astype(np.int32))

    def _emit(self, ids: np.ndarray, labels: np.ndarray, starts: np.ndarray | None = None) -> None:
        if not (labels[1:] != IGNORE).any():  # nothing to predict: its micro-batch's mean loss would be 0/0
            return
        _update(self.digest, ids, labels)
        self.max_id = max(self.max_id, int(ids.max()))
        self.count += 1
        self.pending.append((ids, labels) if starts is None else (ids, labels, starts))
        if len(self.pending) >= _WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        columns = []
        for pieces in zip(*self.pending):
            lengths = np.array([len(piece) for piece in pieces], np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(pieces), pa.int32())))
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        if self.file is not None:
            self.file.write_batch(batch)
        else:
            self.batches.append(batch)
        self.pending = []

    def finish(self) -> Sequences:
        """The sequences (after writing the file and its meta, with a directory).

        Raises:
            FinetuneError: no example, a prompt longer than seq_len, or no sequence with anything to predict.
        """
        import pyarrow as pa

        if self.cut is Cut.PACK and len(self.carry_ids):
            self._emit_packed(self.carry_ids, self.carry_labels, self.carry_starts, 0, len(self.carry_ids))
        self._flush()
        if self.file is not None:
            self.file.close()
        if not self.examples:
            raise FinetuneError(f"{self.source} has only empty rows; add examples")
        if self.too_long:
            number, prompt = min(self.too_long)
            others = f" and {len(self.too_long) - 1} more" if len(self.too_long) > 1 else ""
            raise FinetuneError(
                f"--seq-len {self.seq_len} is below the prompt of {self.source} row {number}{others} ({prompt} prompt "
                f"tokens), so it has nothing to train on; raise --seq-len to at least {prompt + 1} or shorten the "
                "prompts"
            )
        if not self.count:
            raise FinetuneError(f"{self.source} has no tokens to train on (every completion is empty); check the data")
        fingerprint = self.digest.hexdigest()
        if self.directory is None:
            return Sequences(table=pa.Table.from_batches(self.batches, self.schema), fingerprint=fingerprint,
                             max_id=self.max_id)
        meta = {"count": self.count, "fingerprint": fingerprint, "max_id": self.max_id, "cut": self.cut.value,
                "seq_len": self.seq_len}
        (self.directory / META_FILE).write_text(json.dumps(meta))
        return Sequences.open(self.directory)
