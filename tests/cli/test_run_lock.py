"""cli/run_lock.py in process: a full disk at the run's first write, the lock probe that writes nothing, a failed
start that leaves nothing, and the swap directory's name. The live-process cases run the installed script in
test_concurrency.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from finetune.cli import run_lock
from finetune.cli.errors import FinetuneError
from finetune.offload import DirectoryLock


def test_full_output_disk_at_start_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def full(self: DirectoryLock) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DirectoryLock, "acquire", full)
    output = tmp_path / "out"
    with pytest.raises(FinetuneError, match=rf"^no space left on --output {output} \(No space left on device\); free "
                                            "space there, or choose another --output$"):
        with run_lock.hold_output(output, None, None):
            pass


def test_failed_start_removes_the_directory_it_made(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with pytest.raises(RuntimeError), run_lock.hold_output(output, None, None):
        assert DirectoryLock(output).holder() is not None  # held from inside
        raise RuntimeError("the engine refused the budget")
    assert not output.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with run_lock.hold_output(kept, None, None):
        (kept / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "metrics.jsonl"]  # a run's directory stays
    assert DirectoryLock(kept).holder() is None  # and is free again


def test_probe_writes_nothing(tmp_path: Path) -> None:
    run_lock.refuse_if_running(tmp_path / "never-made")
    assert not (tmp_path / "never-made").exists()
    with DirectoryLock(tmp_path):
        with pytest.raises(FinetuneError, match=r"is in use by pid \d+ \(a finetune run that is still going\)"):
            run_lock.refuse_if_running(tmp_path)


def test_swap_name_is_the_output_directory_s(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert run_lock.swap_name(Path("a")) == run_lock.swap_name(tmp_path / "a")  # relative or absolute, one run
    assert run_lock.swap_name(tmp_path / "a") != run_lock.swap_name(tmp_path / "b")
