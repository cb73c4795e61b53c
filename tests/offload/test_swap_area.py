"""The engine's swap directory (offload/swap_area.py) and the locks it is held by (offload/locks.py): private,
one engine at a time, cleared of a killed process's files, and never fooled by links or files others planted."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload import DirectoryLock, LockHeld, SwapArea, ThreadPoolBackend

FOREIGN_UID = 54321  # a user that owns nothing here; chown to it needs root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def test_fresh_area_is_private_and_removed_on_close(tmp_path: Path) -> None:
    first, second = SwapArea.open(tmp_path), SwapArea.open(tmp_path)
    assert first.path.parent == tmp_path and first.path != second.path  # two engines never share a file name
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o700 and first.reclaimed == 0
    (second.path / "chunk").write_bytes(b"x")  # a file its backend did not remove (keep_files)
    first.close()
    second.close()
    assert [p.name for p in tmp_path.iterdir()] == [second.path.name]  # the empty one went, the other stayed
    assert sorted(os.listdir(second.path)) == [".lock", "chunk"]


def test_named_area_reclaims_what_a_killed_process_left(tmp_path: Path) -> None:
    left = tmp_path / "finetune-run-a"
    left.mkdir(mode=0o700)
    (left / "model.layers.0.weights").write_bytes(os.urandom(3 * 4096))
    (left / "stale-dir").mkdir()
    (left / "stale-dir" / "x").write_bytes(os.urandom(4096))
    area = SwapArea.open(tmp_path, "run-a")
    assert area.path == left and sorted(os.listdir(left)) == [".lock"]
    assert area.reclaimed >= 4 * 4096
    area.close()
    assert not left.exists()


def test_a_live_engine_keeps_others_out_and_a_killed_one_does_not(tmp_path: Path) -> None:
    area = SwapArea.open(tmp_path, "run-b")
    with pytest.raises(LockHeld, match=rf"finetune-run-b is in use by pid {os.getpid()}"):
        SwapArea.open(tmp_path, "run-b")
    area.close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from finetune.offload import DirectoryLock
        DirectoryLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
        DirectoryLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with DirectoryLock(tmp_path):  # the kernel dropped the dead process's lock: nothing stale blocks
        pass


def test_planted_link_or_open_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    (target / "precious").write_text("keep me")
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / "finetune-run-c").symlink_to(target)
    with pytest.raises(PermissionError, match="finetune-run-c is a symbolic link"):
        SwapArea.open(swap, "run-c")
    open_to_all = swap / "finetune-run-d"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(PermissionError, match="is open to other users"):
        SwapArea.open(swap, "run-d")
    assert sorted(os.listdir(target)) == ["precious"] and (target / "precious").read_text() == "keep me"


@needs_root
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "finetune-run-e"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, FOREIGN_UID, FOREIGN_UID)
    with pytest.raises(PermissionError, match=f"belongs to another user \\(uid {FOREIGN_UID}\\)"):
        SwapArea.open(tmp_path, "run-e")


def test_swap_file_never_written_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    swap = tmp_path / "swap"
    swap.mkdir(mode=0o700)
    (swap / "chunk").symlink_to(target)
    with ThreadPoolBackend(swap) as backend, pytest.raises(PermissionError, match="is a symbolic link"):
        backend.open("chunk", 4096)
    assert target.read_bytes() == b"untouched"


@needs_root
def test_swap_file_of_another_user_is_not_reused(tmp_path: Path) -> None:
    swap = tmp_path / "swap"
    swap.mkdir(mode=0o700)
    planted = swap / "chunk"
    planted.write_bytes(b"theirs")
    planted.chmod(0o666)
    os.chown(planted, FOREIGN_UID, FOREIGN_UID)
    with ThreadPoolBackend(swap) as backend, pytest.raises(PermissionError, match="owned by another user"):
        backend.open("chunk", 4096)
    assert planted.read_bytes() == b"theirs"


def test_engine_works_in_its_own_area(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "model"))
    device, host = offload.Engine.minimum_budget(model, optim.AdamW())
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / "not-ours.txt").write_text("a file of the user's")
    with offload.Engine(model, optim.AdamW(), offload.Budget(device=device, host=host, nvme=swap)) as engine:
        engine.train_step(random_batch(128, batch=2, seq=8))
        area = engine.swap_directory
        assert area.parent == swap and stat.S_IMODE(area.stat().st_mode) == 0o700
        assert engine.store.bytes_written > 0 and any(p.name != ".lock" for p in area.iterdir())
    assert sorted(os.listdir(swap)) == ["not-ours.txt"]  # its area went, the user's file stayed
