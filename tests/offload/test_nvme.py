"""Tests for offload/nvme.py: correctness of bytes on disk, the O_DIRECT/buffered split,
queue depth, fallback and file lifecycle. Fresh random data on every run."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from finetune.offload import nvme
from finetune.offload.host_memory import aligned_empty
from finetune.offload.nvme import ThreadPoolBackend, open_backend
from finetune.optim.layout import ALIGNMENT, round_up

MiB = 1 << 20


def _direct_works(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, memoryview(aligned_empty(ALIGNMENT).numpy()), 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _buffer(nbytes: int, *, aligned: bool) -> torch.Tensor:
    """Deliberately placed: at a 4096-byte boundary, or 64 bytes past one (torch's own
    allocator may hand out either, so it cannot be relied on for the unaligned case)."""
    shift = 0 if aligned else 64
    return aligned_empty(nbytes + shift)[shift : shift + nbytes]


def _random(dtype: torch.dtype, nbytes: int, *, aligned: bool) -> torch.Tensor:
    noise = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    return _buffer(nbytes, aligned=aligned).copy_(noise).view(dtype)


def _empty_like(t: torch.Tensor, *, aligned: bool) -> torch.Tensor:
    return _buffer(t.numel() * t.element_size(), aligned=aligned).fill_(0xAB).view(t.dtype)


def _bytes(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes()


class IoSpy:
    """Wraps os.preadv/os.pwritev: records whether each call went to an O_DIRECT fd and the
    highest number of calls running at once. The short sleep widens each call so overlap is
    observable; it cannot create overlap if the code under test issued calls one at a time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sleep: float = 0.0) -> None:
        self.direct_flags: list[bool] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()
        self._sleep = sleep
        for name in ("preadv", "pwritev"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):  # type: ignore[no-untyped-def]
        def spy(fd, buffers, offset):  # type: ignore[no-untyped-def]
            with self._lock:
                self.direct_flags.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            try:
                if self._sleep:
                    time.sleep(self._sleep)
                return real(fd, buffers, offset)
            finally:
                with self._lock:
                    self.running -= 1

        return spy


@pytest.fixture
def swap_dir(tmp_path: Path) -> Path:
    return tmp_path / "swap"


@pytest.fixture
def disk_backend(swap_dir: Path):  # type: ignore[no-untyped-def]
    with ThreadPoolBackend(swap_dir, workers=4, request_bytes=MiB) as backend:
        yield backend


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 10**6 + 3])
def test_aligned_empty(nbytes: int) -> None:
    buf = aligned_empty(nbytes)
    assert buf.dtype == torch.uint8 and buf.device.type == "cpu"
    assert buf.numel() == round_up(nbytes) and buf.numel() % ALIGNMENT == 0
    assert buf.data_ptr() % ALIGNMENT == 0
    buf.fill_(7)  # the whole slice is usable memory
    assert int(buf.sum()) == 7 * buf.numel()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_aligned_empty_pin_memory_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        aligned_empty(4096, pin_memory=True)


def test_round_up() -> None:
    assert [round_up(n) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]
    assert round_up(5, 4) == 8


def test_backend_uses_odirect_on_real_disk(tmp_path: Path, disk_backend: ThreadPoolBackend) -> None:
    if not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    assert disk_backend.name == "threadpool-odirect"
    assert disk_backend.open("f", 4096).direct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("nbytes", [3 * 4096, 6000, 2 * MiB + 4096, 2 * MiB + 100])
@pytest.mark.parametrize("offset", [0, 5 * 4096, 12345])
@pytest.mark.parametrize("aligned", [True, False])
def test_round_trip(disk_backend: ThreadPoolBackend, monkeypatch: pytest.MonkeyPatch,
                    dtype: torch.dtype, nbytes: int, offset: int, aligned: bool) -> None:
    src = _random(dtype, nbytes, aligned=aligned)
    swap = disk_backend.open("rt", offset + nbytes)
    spy = IoSpy(monkeypatch)
    swap.write_from(src, offset).result()
    swap.sync()
    with open(swap.path, "rb") as f:  # independent check of what actually reached the file
        f.seek(offset)
        assert f.read(nbytes) == _bytes(src)
    dest = _empty_like(src, aligned=aligned)
    swap.read_into(dest, offset).result()
    assert torch.equal(dest.view(torch.uint8), src.view(torch.uint8))

    pieces = -(-nbytes // MiB)
    assert len(spy.direct_flags) == 2 * pieces
    if not swap.direct or not aligned or offset % ALIGNMENT:
        assert not any(spy.direct_flags)  # unaligned requests are served buffered
    else:  # every full piece goes O_DIRECT; only an unaligned tail goes buffered
        tail_direct = nbytes % ALIGNMENT == 0
        expected = [True] * (pieces - 1) + [tail_direct]
        # Pieces run on several I/O threads, so the spy sees them in any order: compare counts, not sequences.
        assert sorted(spy.direct_flags) == sorted(expected + expected)


def test_large_request_is_split_and_overlapped(disk_backend: ThreadPoolBackend,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 64 * MiB
    src = _random(torch.uint8, nbytes, aligned=True)
    swap = disk_backend.open("big", nbytes)
    spy = IoSpy(monkeypatch, sleep=0.002)
    swap.write_from(src).result()
    dest = aligned_empty(nbytes)
    swap.read_into(dest).result()
    assert torch.equal(dest, src)
    assert len(spy.direct_flags) == 2 * 64
    assert spy.max_running > 1


def test_many_concurrent_requests_from_several_threads(disk_backend: ThreadPoolBackend) -> None:
    sizes = [4096 * (i % 5 + 1) + (i % 3) * 333 for i in range(32)]
    offsets = [sum(round_up(s) + 4096 for s in sizes[:i]) + (i % 2) * 17 for i in range(32)]
    swap = disk_backend.open("many", offsets[-1] + sizes[-1])
    srcs = [_random(torch.uint8, s, aligned=i % 2 == 0) for i, s in enumerate(sizes)]

    def submit_all(submit) -> list:  # type: ignore[no-untyped-def]
        futures: list = [None] * 32
        def worker(k: int) -> None:
            for i in range(k, 32, 4):
                futures[i] = submit(i)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return futures

    for fut in submit_all(lambda i: swap.write_from(srcs[i], offsets[i])):
        fut.result()
    dests = [_empty_like(s, aligned=i % 2 == 0) for i, s in enumerate(srcs)]
    for fut in submit_all(lambda i: swap.read_into(dests[i], offsets[i])):
        fut.result()
    for src, dest in zip(srcs, dests):
        assert torch.equal(src, dest)


@pytest.mark.parametrize("direct", [True, False])
def test_read_range_from_arbitrary_file(tmp_path: Path, direct: bool) -> None:
    size = 3 * MiB + 777
    payload = os.urandom(size)
    source = tmp_path / "model.safetensors"
    source.write_bytes(payload)
    windows = [(0, 10), (1, 4095), (4095, 2), (4096, 4096), (8192, 2 * MiB),
               (12345, 2 * MiB + 3), (size - 1000, 1000), (size - 5, 5), (0, size)]
    with ThreadPoolBackend(tmp_path / "swap", request_bytes=MiB, direct=direct) as backend:
        futures = []
        for offset, length in windows:
            for aligned in (True, False):
                dest = _buffer(length, aligned=aligned)
                futures.append((offset, length, dest, backend.read_range(source, offset, dest)))
        floats = torch.empty(1024, dtype=torch.float32)  # any dtype: bytes land as-is
        futures.append((100, 4096, floats, backend.read_range(str(source), 100, floats)))
        for offset, length, dest, fut in futures:
            fut.result()
            assert _bytes(dest) == payload[offset : offset + length], (offset, length)


def test_reading_past_eof_raises(tmp_path: Path, disk_backend: ThreadPoolBackend) -> None:
    swap = disk_backend.open("short", 8192)
    with pytest.raises(EOFError, match="past the end"):
        swap.read_into(aligned_empty(4096), 8192).result()
    with pytest.raises(EOFError):
        swap.read_into(torch.empty(100, dtype=torch.uint8), 8100).result()
    source = tmp_path / "small.bin"
    source.write_bytes(os.urandom(5000))
    with pytest.raises(EOFError):
        disk_backend.read_range(source, 4990, torch.empty(11, dtype=torch.uint8)).result()


def _check_buffered_fallback(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvme, "fallback_warning", nvme.OnceWarning())  # earlier tests may have warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = [ThreadPoolBackend(root / "a", request_bytes=MiB),
                    ThreadPoolBackend(root / "b", request_bytes=MiB)]
    fallback = [w for w in caught if "O_DIRECT" in str(w.message)]
    assert len(fallback) == 1 and str(root / "a") in str(fallback[0].message)
    for backend in backends:
        with backend:
            assert backend.name == "threadpool-buffered" and not backend.direct
            swap = backend.open("f", 3 * MiB)
            assert not swap.direct
            src = _random(torch.bfloat16, 2 * MiB + 6, aligned=True)
            swap.write_from(src, 4096).result()
            dest = _empty_like(src, aligned=True)
            swap.read_into(dest, 4096).result()
            assert torch.equal(dest.view(torch.uint8), src.view(torch.uint8))


def test_buffered_fallback_on_tmpfs(monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if _direct_works(root):
            pytest.skip("/dev/shm accepts O_DIRECT here (tmpfs does since Linux 6.6)")
        _check_buffered_fallback(root, monkeypatch)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_buffered_fallback_when_odirect_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: simulates a filesystem that refuses O_DIRECT the way tmpfs used to."""
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", refusing_open)
    _check_buffered_fallback(tmp_path, monkeypatch)


def test_files_are_private_and_removed_on_close(swap_dir: Path) -> None:
    backend = ThreadPoolBackend(swap_dir)
    swap = backend.open("params.bin", 10_000)
    assert stat.S_IMODE(os.stat(swap.path).st_mode) == 0o600
    assert os.path.getsize(swap.path) == round_up(10_000)
    swap.write_from(_random(torch.uint8, 4096, aligned=True)).result()
    backend.close()
    assert not swap.path.exists() and not swap_dir.exists()


def test_keep_files_keeps_data_and_directory(tmp_path: Path) -> None:
    swap_dir = tmp_path / "swap"
    src = _random(torch.float32, 4096 * 3, aligned=True)
    with ThreadPoolBackend(swap_dir, keep_files=True) as backend:
        backend.open("state.bin", 4 * 4096 * 3).write_from(src).result()
    path = swap_dir / "state.bin"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    with ThreadPoolBackend(swap_dir) as backend:  # reopening: a file this backend did not create
        dest = torch.empty_like(src)
        backend.open("state.bin", 4 * 4096 * 3).read_into(dest).result()
    assert torch.equal(dest.view(torch.uint8), src.view(torch.uint8)) and path.exists()


def test_close_leaves_preexisting_directory(tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("not ours")
    with ThreadPoolBackend(tmp_path) as backend:
        backend.open("x", 4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with ThreadPoolBackend(empty) as backend:
        backend.open("x", 4096)
    assert empty.is_dir() and not any(empty.iterdir())


def test_rejects_bad_requests(disk_backend: ThreadPoolBackend) -> None:
    swap = disk_backend.open("bad", 8192)
    with pytest.raises(ValueError, match="contiguous"):
        swap.write_from(torch.zeros(64, 64)[:, 0])
    with pytest.raises(ValueError, match="bare file name"):
        disk_backend.open("../escape", 4096)
    swap.close()
    with pytest.raises(ValueError, match="closed"):
        swap.write_from(torch.zeros(4))


def test_open_backend_on_cpu_machine_skips_kvikio(swap_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU path is what is under test")
    with open_backend(swap_dir, request_bytes=MiB) as backend:
        assert type(backend) is ThreadPoolBackend
    assert "kvikio" not in sys.modules
