"""The planner's knobs: the load wait a prefetch depth leaves (load_stall.py) and the depth and split chosen from it
(tuning.py).

Reference: hand-computed waits for a small sequence of holds; for the choices, `predict` itself (each chosen
setting is the fastest of those predicted, within the budget's room and above each tier's floor).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoConfig

from finetune import offload, optim
from finetune.offload.block_layout import block_layouts
from finetune.offload.blocks import find_blocks
from finetune.offload.cost_model import Machine, Workload, predict
from finetune.offload.floors import model_floors
from finetune.offload.load_stall import Hold, load_wait, prefetch_bytes
from finetune.offload.tuning import DEPTHS, choose_settings

# Compute-bound with a quick disk: what separates the depths is how much compute hides each load.
MACHINE = Machine("test", flops=1e9, disk_read=1e9, disk_write=1e9, optimizer_rate=1e12)
WORKLOAD = Workload(batch_size=1, seq_len=16, updates_in_backward=True)


def test_load_wait_is_what_the_compute_of_the_holds_ahead_cannot_hide():
    # A big load (the embedding's) with no compute, then three layers: loads 6, 1, 1, 1 s; compute 0, 2, 2, 2 s.
    holds = [Hold(600, 0.0), Hold(100, 1.0), Hold(100, 1.0), Hold(100, 1.0)]
    wait = [load_wait(holds, read_s=9.0, compute_s=6.0, other_bytes=0, depth=depth) for depth in range(4)]
    assert wait[0] == pytest.approx(9.0)  # nothing prefetched: every load waited for in full
    # depth 1: the embedding hides behind the last layer (6 - 2), the first layer behind the embedding (1 - 0)
    assert wait[1] == pytest.approx(4.0 + 1.0)
    assert wait[2] == pytest.approx(2.0)  # the embedding behind two layers (6 - 4); layer 1 behind 0 + 2
    assert wait[3] == pytest.approx(0.0)
    # As many bytes again read for the update (no hold waits for them): each load takes half of the read time.
    assert load_wait(holds, 9.0, 6.0, other_bytes=900, depth=1) == pytest.approx((3 - 2) + (0.5 - 0))
    # The engine's fixed cost per block is paid by every hold, the embedding's too: 3 s of 6 spread evenly.
    assert load_wait(holds, 9.0, 6.0, other_bytes=0, depth=1, fixed_s=3.0) == pytest.approx((6 - 1.75) + (1 - 0.75))


def _meta(tmp_path, **overrides):
    path = save_tiny_model("llama", tmp_path / "model", seed=2, num_hidden_layers=6, vocab_size=4096, **overrides)
    return offload.meta_model(AutoConfig.from_pretrained(path))


def test_a_prefetch_without_room_is_predicted_as_none(tmp_path):
    """The store drops a prefetch that finds no room beside the floor, so its loads are waited for in full."""
    model, optimizer = _meta(tmp_path), optim.AdamW(lr=1e-3)
    need = model_floors(model, optimizer, torch.float32, None)
    block = prefetch_bytes(block_layouts(model, find_blocks(model), None, torch.float32), torch.float32)

    def wait(device: int, depth: int) -> float:
        workload = Workload(batch_size=1, seq_len=16, updates_in_backward=True, prefetch=depth)
        return predict(model, optimizer, workload, MACHINE, device_budget=device, host_budget=need.host * 2,
                       nvme=True, compute_dtype=torch.float32).busy_s["load wait"]

    tight, roomy = need.device + block // 2, need.device + 4 * block
    assert wait(tight, 2) == wait(tight, 0) > wait(roomy, 2) > wait(roomy, 4)


def test_the_depth_chosen_is_the_fastest_that_fits(tmp_path):
    model, optimizer = _meta(tmp_path), optim.AdamW(lr=1e-3)
    need = model_floors(model, optimizer, torch.float32, None)
    block = prefetch_bytes(block_layouts(model, find_blocks(model), None, torch.float32), torch.float32)
    kept = {"host_budget": 2 * need.host, "nvme": True, "compute_dtype": torch.float32}
    roomy = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=need.device + 4 * block, **kept)
    assert roomy.tried == len(DEPTHS) and roomy.prefetch > 1  # a deeper prefetch hides the embedding's load
    for depth in DEPTHS:
        other = predict(model, optimizer, Workload(batch_size=1, seq_len=16, updates_in_backward=True, prefetch=depth),
                        MACHINE, device_budget=need.device + 4 * block, **kept)
        assert roomy.prediction.step_s <= other.step_s
    # Room for one block only: the deeper depths are not tried, the shallow one is chosen.
    tight = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=need.device + block, **kept)
    assert (tight.prefetch, tight.tried) == (1, 1)
    assert tight.prediction.step_s > roomy.prediction.step_s
    # A depth the user gave is kept, even where the planner would choose another.
    given = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=need.device + 4 * block, prefetch=4,
                            **kept)
    assert (given.prefetch, given.tried) == (4, 1)


def test_the_split_of_one_total_keeps_each_tier_above_its_floor(tmp_path):
    model, optimizer = _meta(tmp_path), optim.AdamW(lr=1e-3)
    need = model_floors(model, optimizer, torch.float32, None)
    total = need.device + need.host + need.state // 2  # streams, whatever the split
    even = need.device + (total - need.device - need.host) // 2
    kept = {"nvme": True, "compute_dtype": torch.float32}
    fixed = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=even, host_budget=total - even, **kept)
    chosen = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=even, host_budget=total - even,
                             split=True, **kept)
    assert chosen.device_budget + chosen.host_budget == total
    assert chosen.device_budget >= need.device and chosen.host_budget >= need.host
    assert chosen.tried > fixed.tried and chosen.prediction.step_s <= fixed.prediction.step_s
    assert (fixed.device_budget, fixed.host_budget) == (even, total - even)  # without split, the budgets stay
    at_floor = choose_settings(model, optimizer, WORKLOAD, MACHINE, device_budget=need.device,
                               host_budget=need.host, split=True, **kept)
    assert (at_floor.device_budget, at_floor.host_budget) == (need.device, need.host)  # nothing to split
