"""Budget parsing: the sizes users type, and clear errors for the ones that are not sizes."""

from __future__ import annotations

import pytest

from finetune.offload import Budget, detect_hardware, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 * 2**20), ("8GB", 8 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096), ("64 kb", 65536),
     (123, 123), ("2T", 2 * 2**40)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-3GB", "eight GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_budget_reports_every_bad_field_at_once(tmp_path):
    with pytest.raises(ValueError, match="Budget.device.*Budget.host"):
        Budget(device="lots", host="more")


def test_budget_defaults_come_from_the_machine(tmp_path):
    import torch

    device, host = Budget(nvme=tmp_path).resolved(torch.device("cpu"))
    hardware = detect_hardware("cpu")
    assert 0 < device <= hardware.ram_total and 0 < host <= hardware.ram_total
    assert Budget(device="1GB", host=1000).resolved(torch.device("cpu")) == (2**30, 1000)
    assert hardware.disk_free(tmp_path / "not" / "yet") > 0


def test_frozen_weights_read_from_files_need_no_swap_room():
    """LoRA on a model directory: the frozen base is read from its safetensors when needed, never swapped, so
    memory and swap need room only for the rest of the state."""
    from finetune.offload.floors import Floors, check_budget

    need = Floors(device=100, host=100, largest_layer="layer 0", state=10_000, frozen_in_files=9_000)
    check_budget(need, 600, 600, None, frozen_in_files=True)  # 1200 bytes of memory hold the 1000 that train
    with pytest.raises(ValueError, match="the training state needs 9.77 KB but Budget.device \\+ Budget.host"):
        check_budget(need, 600, 600, None)
