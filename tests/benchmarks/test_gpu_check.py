"""benchmarks/gpu_check.sh's CPU part, as CI runs it: it says there is no CUDA, runs the CUDA tests (which skip),
compiles the benchmark scripts, writes its JSON and exits 0. On a GPU machine the script itself is the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run benchmarks/gpu_check.sh itself")
def test_the_cpu_part_passes_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA on this machine" in result.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False
    parts = {part["part"]: part for part in report["parts"]}
    assert {"cuda_tests", "compile"} <= parts.keys() and all(p["exit_code"] == 0 for p in parts.values()), parts
    assert "skipped" in parts["cuda_tests"]["last_line"]  # the CUDA tests ran, and skipped here
