"""The swap file of each chunk, copy-on-write under checkpoints: a version a checkpoint references is never
overwritten.

A chunk's bytes go to one file, its current version, rewritten in place write after write, so between checkpoints a
chunk costs one file's disk space. A checkpoint commits the current versions of the chunks it covers (`commit`):
it records each one's file name and checksum, and from then on those files are read-only. The next write of a
committed chunk goes to a new file (the next version) and leaves the committed one as the checkpoint has it. So a
checkpoint of state that already lives in swap files writes nothing but what is still only in memory, and a kill
at any moment leaves every committed version whole. A version is deleted once no kept checkpoint references it
and no chunk uses it as current (`drop`).

A speculative update pins its chunks' versions the same way for one step (`pin`): every step then moves each chunk
it writes to another version, and the pinned one is dropped when the step commits. Making and deleting those files
every step cost about a fifth of a step on memory_bound's model (creating and preallocating a file is far slower
than rewriting one), so a dropped pinned version stays on disk as the chunk's spare (`_spares`), the file its next
version is written to: each such chunk alternates between two files.

Every write's bytes are hashed (XXH3, checksums.py) on the I/O thread once the write completes, before the write
counts as done: a checkpoint reads its checksums from here, never from the disk. With `verify`, each read is also
checked against the hash of what was written. Frozen chunks' files are their sources (the model's own
safetensors): read-only, never versioned, never checked.

Threads: `write` and `read` are called by the store with its lock held, and their hashing runs on I/O threads;
`_checksums` is written only by a write's completion, which resolves the write's future afterwards, so a caller
that has waited for the write sees its checksum. `commit`, `drop`, `hold` and `adopt` run with no request of the
chunks they touch in flight (the store waits for them first).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from .checksums import ChecksumMismatch, checksum_tensor
from .chunks import Chunk
from .durable import fsync_directory
from .swap import SwapBackend, SwapFileIO

__all__ = ["ChunkFiles", "VersionRef"]

VersionRef = tuple[str, str] | None
"""What a checkpoint records of one chunk: (file name, XXH3 of its bytes), or None for a chunk of all zeros."""


class ChunkFiles:
    """Each chunk's current swap file, and the committed versions kept checkpoints reference."""

    def __init__(self, backend: SwapBackend | None, *, verify: bool = False) -> None:
        self.backend = backend
        self.verify = verify
        self._files: dict[str, SwapFileIO] = {}  # chunk key -> its current version, open
        self._names: dict[str, str] = {}  # chunk key -> the current version's file name
        self._checksums: dict[str, str] = {}  # chunk key -> checksum of the bytes its current version holds
        self._refs: Counter[str] = Counter()  # file name -> kept checkpoints referencing it (read-only while > 0)
        self._counter = itertools.count()
        self._pinned: dict[str, str] = {}  # file name -> chunk key, of the versions `pin` referenced
        self._spares: dict[str, str] = {}  # chunk key -> a closed version file of its own nothing references

    # --------------------------------------------------------------------------------------------- I/O

    def write(self, chunk: Chunk, src: torch.Tensor) -> Future[None]:
        """Start writing `src`, all of `chunk`'s bytes, to its current version (a new one if that is committed);
        the future resolves once the bytes are written and hashed."""
        key = chunk.key
        if self._names.get(key) in self._refs:
            self._retire(key)  # committed: leave it as the checkpoints have it
        file = self.of(chunk)
        self._checksums.pop(key, None)  # the file holds neither the old bytes nor the new ones until done
        written = file.write_from(src)
        if src.is_meta:  # a replay's (cost_model.py): its buffers hold no bytes to hash
            return written
        done: Future[None] = Future()

        def hashed(future: Future[None]) -> None:
            error = future.exception()
            if error is None:
                self._checksums[key] = checksum_tensor(src)  # `src` is whole: the caller frees it only after `done`
                done.set_result(None)
            else:
                done.set_exception(error)

        written.add_done_callback(hashed)
        return done

    def read(self, chunk: Chunk, dest: torch.Tensor) -> Future[None]:
        """Start filling `dest` with `chunk`'s bytes from its file; with `verify`, resolves once they are checked."""
        future = self.of(chunk).read_into(dest)
        expected = self._checksums.get(chunk.key) if self.verify and chunk.source is None else None
        if expected is None:
            return future
        checked: Future[None] = Future()

        def check(done: Future[None]) -> None:
            error = done.exception()
            if error is None and checksum_tensor(dest) != expected:
                error = ChecksumMismatch(self._files[chunk.key].path, f"(chunk {chunk.key}) gave back other bytes than "
                                         "were written to it: the disk or its file system is failing")
            if error is None:
                checked.set_result(None)
            else:
                checked.set_exception(error)

        future.add_done_callback(check)
        return checked

    def of(self, chunk: Chunk) -> SwapFileIO:
        """`chunk`'s current file, opened (and made, if new) on first use."""
        if chunk.source is not None:
            return chunk.source  # type: ignore[return-value]
        file = self._files.get(chunk.key)
        if file is None:
            assert self.backend is not None, "a chunk without a swap backend never leaves memory"
            name = self._spares.pop(chunk.key, None) or self._new_name(chunk.key)
            file = self._files[chunk.key] = self.backend.open(name, chunk.nbytes)
            self._names[chunk.key] = name
        return file

    def sync(self) -> None:
        """Make every file's bytes, and the directory's entries for new versions, durable."""
        for file in self._files.values():
            file.sync()
        if self.backend is not None:
            fsync_directory(self.backend.directory)

    def release(self, chunk: Chunk) -> None:
        """Give back the disk space of `chunk`'s current file, if it has one and no checkpoint needs it: its bytes
        are no longer needed (a gradient chunk its update consumed). Its next write opens a new version."""
        if chunk.key in self._files:
            self._retire(chunk.key)
        spare = self._spares.pop(chunk.key, None)
        if spare is not None:
            self.backend.delete(spare)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------ versions

    def commit(self, chunks: Iterable[Chunk]) -> dict[str, VersionRef]:
        """Reference the current version of each chunk for a new checkpoint; they stay as they are until `drop`.

        Every chunk must be whole in its file or all zeros (the store flushed and waited for its writes)."""
        refs: dict[str, VersionRef] = {}
        for chunk in chunks:
            if chunk.zero:
                refs[chunk.key] = None
                continue
            name = self._names[chunk.key]
            refs[chunk.key] = (name, self._checksums[chunk.key])
            if not self._refs[name]:
                self.backend.keep(self._files[chunk.key])  # type: ignore[union-attr]  # survives close
            self._refs[name] += 1
            self._pinned.pop(name, None)  # a checkpoint's now: never a spare
        return refs

    def spares(self) -> list[str]:
        """The spare versions on disk (see the module docstring): files no checkpoint references."""
        return list(self._spares.values())

    def pin(self, chunk: Chunk) -> VersionRef:
        """Reference `chunk`'s current version (it must be whole in its file, or the chunk all zeros) for a speculative
        update, which may be rolled back (updates.py): as under `commit`, the chunk's next write goes to a new version
        and leaves this one as it is. Unlike a checkpoint's, the file stays the backend's, removed on close: nothing
        outlives the step. `drop` unpins it, `restore` makes it current again."""
        if chunk.zero:
            return None
        name = self._names[chunk.key]
        if not self._refs[name]:  # a version a checkpoint also references is never a spare
            self._pinned[name] = chunk.key
        self._refs[name] += 1
        return name, self._checksums.get(chunk.key, "")  # none only in a replay (traffic.py): its files hold no bytes

    def restore(self, chunk: Chunk, ref: tuple[str, str]) -> None:
        """Make the pinned version `ref` `chunk`'s current one again, unpinned, and give back the disk space of the
        version written since (if one was): the rollback of a speculative update."""
        self.release(chunk)  # a version written since is removed; `ref`'s own file, still pinned, is only closed
        name, checksum = ref
        self._files[chunk.key] = self.backend.open(name, chunk.nbytes)  # type: ignore[union-attr]
        self._names[chunk.key] = name
        if checksum:
            self._checksums[chunk.key] = checksum
        self.drop([name])  # now current and unreferenced: rewritten in place again

    def hold(self, names: Iterable[str]) -> None:
        """Reference versions a kept checkpoint of an earlier process left (found in the directory at start)."""
        for name in names:
            self._refs[name] += 1

    def drop(self, names: Iterable[str]) -> None:
        """Stop referencing versions for one checkpoint; delete those no kept checkpoint references any more,
        unless a chunk uses one as its current version (which is then rewritten in place again)."""
        current = {name: key for key, name in self._names.items()}
        for name in names:
            self._refs[name] -= 1
            if self._refs[name] > 0:
                continue
            del self._refs[name]
            pinned_by = self._pinned.pop(name, None)
            if name in current:
                self.backend.own(self._files[current[name]])  # type: ignore[union-attr]  # removed on close again
            elif pinned_by is not None and pinned_by not in self._spares and pinned_by in self._names:
                self._spares[pinned_by] = name  # never a checkpoint's: still the backend's, removed on close
            else:
                self.backend.delete(name)  # type: ignore[union-attr]

    def adopt(self, chunk: Chunk, ref: tuple[str, str]) -> None:
        """Make the committed version `ref` (held: see `hold`) `chunk`'s current one, its bytes unread: a resume
        that costs no copy. The chunk's previous file is released."""
        self.release(chunk)
        name, checksum = ref
        assert self._refs[name] > 0, f"version {name} is adopted without a checkpoint that holds it"
        self._files[chunk.key] = self.backend.open(name, chunk.nbytes)  # type: ignore[union-attr]
        self.backend.keep(self._files[chunk.key])  # type: ignore[union-attr]  # a kept checkpoint's: never removed
        self._names[chunk.key], self._checksums[chunk.key] = name, checksum

    def path(self, name: str) -> Path:
        """Where version `name` lives."""
        assert self.backend is not None
        return self.backend.directory / name

    def _retire(self, key: str) -> None:
        """Close `key`'s current file; delete it unless a checkpoint references it."""
        file, name = self._files.pop(key), self._names.pop(key)
        self._checksums.pop(key, None)
        assert self.backend is not None
        if name in self._refs:
            self.backend.detach(file)  # closed, left on disk for the checkpoints
        else:
            self.backend.remove(file)

    def _new_name(self, key: str) -> str:
        """A file name no version in use or kept has: the chunk's key, then a number."""
        stem = key.replace("/", ".")
        while True:
            name = f"{stem}.{next(self._counter)}"
            if name not in self._refs:
                return name
