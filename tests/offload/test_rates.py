"""Rates: measured once, cached by what each depends on, refreshed on request; hardware profiles by name or file.

Reference: the progress messages, one per measurement ("measuring ..."): a cached rate is not measured again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
import torch

from finetune import offload, optim
from finetune.offload.contention import watch

SHAPE = (16, 64, 128)


class Measurements(list):
    """The progress lines that announce a measurement (a busy machine adds a line of its own, not counted)."""

    def append(self, message: str) -> None:
        if message.startswith("measuring"):
            super().append(message)


def test_rates_are_measured_once_and_cached_per_file_system(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    said = Measurements()
    first = offload.measure_machine(tmp_path / "a" / "swap", torch.float32, SHAPE, progress=said.append)
    assert len(said) == 5, said  # disk, compute, engine costs, dequantization, MeZO's perturbation
    assert first.flops > 0 and first.disk_read > 0 and first.disk_write > 0 and first.baseline_rss > 2**20
    assert 0 <= first.io_overlap <= 1
    assert first.block_overhead_s > 0 and first.optimizer_rate > 0 and not first.cuda
    # LoRA: each adapter costs beyond its FLOPs, and peft's modules add to the process (measured: ~1.4 ms, ~60 MiB)
    assert 0 < first.adapter_overhead_s < first.block_overhead_s and first.peft_rss > 2**20
    assert first.dequantize_rate > 1e7  # NF4 -> fp32 bytes per second (~1.3e9 on the 2-core CI machine)
    assert first.perturb_rate > 1e6  # weights per second MeZO draws z for and applies it
    assert first.mezo_update_rate > 1e6 and first.mezo_update_rate_bf16 > 1e6  # and its update rewrites
    said.clear()
    again = offload.measure_machine(tmp_path / "b" / "swap", torch.float32, SHAPE, progress=said.append)
    assert again == first and not said  # another directory on the same file system: nothing measured
    offload.measure_machine(tmp_path / "b", torch.float32, (32, 64, 128), progress=said.append)
    assert len(said) == 1 and "compute" in said[0]  # a new shape measures only the FLOP/s
    said.clear()
    disk = offload.refresh_disk_rates(tmp_path, 2**24)
    refreshed = offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, progress=said.append)
    assert not said and (refreshed.disk_write, refreshed.disk_read, refreshed.io_overlap) == disk
    offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, refresh=True, progress=said.append)
    assert len(said) == 5
    said.clear()
    offload.measure_machine(tmp_path / "c", torch.bfloat16, SHAPE, progress=said.append)
    assert len(said) == 2 and "compute" in said[0] and "dequantization" in said[1]  # both depend on the dtype
    # An "engine costs" entry without the LoRA fields (written by an older version) is measured again.
    cache = tmp_path / "cache" / "rates.json"
    entries = json.loads(cache.read_text())
    for entry in entries["engine costs"].values():
        del entry["adapter_overhead_s"]
    cache.write_text(json.dumps(entries))
    said.clear()
    again = offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, progress=said.append)
    assert len(said) == 1 and "engine costs" in said[0] and again.adapter_overhead_s > 0
    # The run's optimizer: its own update timed, once per optimizer class (MeZO's are the perturbation rates).
    said.clear()
    eight_bit = offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, optimizer=optim.AdamW8bit(),
                                        progress=said.append)
    assert len(said) == 1 and "update rate" in said[0] and eight_bit.update_rate > 1e5 and again.update_rate is None
    said.clear()
    offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, optimizer=optim.AdamW8bit(lr=1e-3),
                            progress=said.append)
    assert not said  # the same class again: cached
    assert offload.measure_machine(tmp_path / "c", torch.float32, SHAPE, optimizer=optim.MeZO()).update_rate is None


def test_hardware_profiles_by_name_or_file(tmp_path):
    names = offload.profile_names()
    assert {"fuyou-rtx4090", "slideformer-rtx4090", "h200-128gb", "laptop-24gb-cpu"} <= set(names)
    assert offload.hardware_profile("h200-128gb").cuda and not offload.hardware_profile("laptop-24gb-cpu").cuda
    with pytest.raises(ValueError, match="no hardware profile 'nope'; use one of"):
        offload.hardware_profile("nope")
    mine = tmp_path / "box.json"
    mine.write_text(json.dumps({"flops": 1e12, "disk_read": 1e9, "disk_write": 1e9, "optimizer_rate": 1e9}))
    assert offload.hardware_profile(mine).name == "box"
    mine.write_text(json.dumps({"flops": 1e12, "tflops": 3}))
    with pytest.raises(ValueError, match="unknown fields \\['tflops'\\]"):
        offload.hardware_profile(mine)


def test_rates_measured_beside_other_work_are_said_so_and_trusted_an_hour(tmp_path, monkeypatch):
    """Other processes busy on every core during a probe: the entry records it, a progress line says so, and the
    planner measures again once it is an hour old (a quiet one lasts a week)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(psutil.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # started
        with watch() as seen:
            time.sleep(1.0)
    finally:
        for spinner in spinners:
            spinner.kill()
    assert seen.busy and seen.others_cpu > 0.5
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    offload.measure_machine(tmp_path / "swap", torch.float32, SHAPE)
    cache = tmp_path / "cache" / "rates.json"

    def disk_entry_says(others_cpu: float, age_s: float) -> list[str]:
        entries = json.loads(cache.read_text())
        for entry in entries["disk rates"].values():
            entry.update(others_cpu=others_cpu, measured_at=time.time() - age_s)
        cache.write_text(json.dumps(entries))
        said = Measurements()
        offload.measure_machine(tmp_path / "swap", torch.float32, SHAPE, progress=said.append)
        return said

    assert disk_entry_says(0.9, 600) == []
    assert disk_entry_says(0.0, 7200) == []
    assert len(disk_entry_says(0.9, 7200)) == 1
