"""The cost model against the engine it predicts.

Reference: a real engine on a tiny Llama with every chunk through NVMe, its store's byte counters over steps 2-4.
The traffic simulation (`offload.traffic`) replays the engine's order on the real store policy, so its bytes
must agree; the async staging thread makes the engine's own count vary by a few percent from step to step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload.block_layout import block_layouts
from finetune.offload.blocks import find_blocks
from finetune.offload.chunks import Tier
from finetune.offload.cost_model import Machine, Workload, dequantized_bytes, lora_modules, predict, step_flops
from finetune.offload.traffic import simulate_traffic

TOLERANCE = 0.2  # the engine's async prefetches vary its bytes per step by up to ~15% (measured)


def _engine_bytes(path, tmp_path, optimizer, scale: float, **options):
    model = AutoModelForCausalLM.from_pretrained(path)
    device, host = offload.Engine.minimum_budget(model, optimizer)
    budget = offload.Budget(device=int(device * scale), host=int(host * scale), nvme=tmp_path / "swap")
    generator = torch.Generator().manual_seed(0)
    accumulation = options.get("accumulation_steps", 1)
    per_step = []
    with offload.Engine(model, optimizer, budget, **options) as engine:
        for _ in range(4):
            read, written = engine.store.bytes_read, engine.store.bytes_written
            engine.train_step(random_batch(128, batch=2 * accumulation, seq=12, generator=generator))
            per_step.append((engine.store.bytes_read - read, engine.store.bytes_written - written))
        limits = dict(engine.store.limits)
    mean = [sum(column) / 3 for column in zip(*per_step[1:])]
    return mean, limits


@pytest.mark.parametrize(
    "name, scale, options",
    [
        ("adamw", 1.0, {}),
        ("adamw", 2.0, {}),
        ("adamw", 1.5, {"max_grad_norm": 1e9}),  # exact clipping, speculative, never reached: every step commits
        ("adamw", 1.5, {"accumulation_steps": 2}),  # the vertical schedule: one micro-batch's traffic
        ("adamw", 1.5, {"accumulation_steps": 2, "vertical": False}),
        ("adamw8bit", 1.5, {}),
        ("mezo", 1.0, {}),
    ],
)
def test_simulated_traffic_is_what_the_engine_moves(tmp_path, name, scale, options):
    path = save_tiny_model("llama", tmp_path / "model", seed=2, num_hidden_layers=6)
    make = {"adamw": lambda: optim.AdamW(lr=1e-3), "adamw8bit": lambda: optim.AdamW8bit(lr=1e-3),
            "mezo": lambda: optim.MeZO(lr=1e-3)}[name]
    (read, written), limits = _engine_bytes(path, tmp_path, make(), scale, **options)
    meta = offload.meta_model(AutoConfig.from_pretrained(path))
    plan = find_blocks(meta)
    traffic = simulate_traffic(
        block_layouts(meta, plan, None, torch.float32), plan, make(), torch.float32,
        device_bytes=limits[Tier.DEVICE], host_bytes=limits[Tier.HOST], nvme=True, shares_memory=True,
        # Workload.holds_per_pass: the vertical schedule (the default, on this untied model) moves one micro-batch's
        accumulation_steps=options.get("accumulation_steps", 1) if options.get("vertical") is False else 1,
        updates_in_backward=options.get("max_grad_norm") is None, speculative="max_grad_norm" in options, steps=4,
    )
    assert read > 0 and written > 0  # the budget is below the state: it streams
    assert traffic.disk_read == pytest.approx(read, rel=TOLERANCE), (traffic, read)
    assert traffic.disk_write == pytest.approx(written, rel=TOLERANCE), (traffic, written)
    assert max(traffic.peak_device, traffic.peak_host) > 0


def _meta_llama(tmp_path, **overrides):
    path = save_tiny_model("llama", tmp_path / "model", seed=2, **overrides)
    return offload.meta_model(AutoConfig.from_pretrained(path))


def test_flops_count_recompute_and_zeroth_order(tmp_path):
    model = _meta_llama(tmp_path)
    workload = Workload(batch_size=2, seq_len=16)
    layers, head = step_flops(model, workload, zeroth_order=False)
    plain, _ = step_flops(model, Workload(batch_size=2, seq_len=16, recompute=False), zeroth_order=False)
    mezo, _ = step_flops(model, workload, zeroth_order=True)
    assert layers == pytest.approx(plain * 4 / 3)  # forward 1, backward 2, recompute 1
    assert mezo == pytest.approx(plain * 2 / 3)  # two forwards
    assert head > 0


def test_prediction_of_a_streamed_run(tmp_path):
    model = _meta_llama(tmp_path, num_hidden_layers=6)
    machine = Machine("test", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9, baseline_rss=2**28)
    optimizer = optim.AdamW(lr=1e-3)
    device, host = offload.Engine.minimum_budget(model, optimizer)
    streamed = predict(model, optimizer, Workload(batch_size=2, seq_len=16), machine, device_budget=device,
                       host_budget=host, nvme=True, compute_dtype=torch.float32)
    in_memory = predict(model, optimizer, Workload(batch_size=2, seq_len=16), machine, device_budget=2**30,
                        host_budget=2**30, nvme=False, compute_dtype=torch.float32)
    assert streamed.traffic.disk_read > 0 and in_memory.traffic.disk_read == 0
    assert streamed.busy_s["disk"] > 0 and in_memory.busy_s["disk"] == 0
    assert streamed.peak_rss < in_memory.peak_rss  # the budget bounds what the chunks hold
    assert streamed.peak_rss > machine.baseline_rss + device + host
    assert streamed.step_s >= max(streamed.busy_s["disk"], streamed.busy_s["compute"])
    assert streamed.bottleneck in streamed.busy_s
    # A CPU whose compute stalls while the disk works (io_overlap 0) pays the disk's time on top of the cores'.
    def on(other: Machine) -> offload.Prediction:
        return predict(model, optimizer, Workload(batch_size=2, seq_len=16), other, device_budget=device,
                       host_budget=host, nvme=True, compute_dtype=torch.float32)

    stalled = on(dataclasses.replace(machine, io_overlap=0.0))
    busy = stalled.busy_s
    assert stalled.step_s == pytest.approx(max(busy["compute"] + busy["optimizer"] + busy["disk"],
                                               busy["compute"] + busy["load wait"]))
    # A measured update rate prices the update by its parameters (the chunks' elements), not its bytes.
    chunks = sum(b.trainable.numel for b in block_layouts(model, find_blocks(model), optimizer, torch.float32))
    assert on(dataclasses.replace(machine, update_rate=1e6)).busy_s["optimizer"] == pytest.approx(chunks / 1e6)


def test_prediction_on_a_gpu_profile_counts_the_host_device_link(tmp_path):
    """CUDA's memory model: weights go up to the device and gradients come down, every step."""
    model = _meta_llama(tmp_path, num_hidden_layers=4)
    machine = offload.hardware_profile("h200-128gb")
    optimizer = optim.AdamW(lr=1e-3)
    device, host = offload.Engine.minimum_budget(model, optimizer, compute_dtype=torch.bfloat16)
    prediction = predict(model, optimizer, Workload(batch_size=2, seq_len=16, updates_in_backward=True), machine,
                         device_budget=device, host_budget=4 * host, nvme=True, compute_dtype=torch.bfloat16)
    assert prediction.traffic.host_to_device > 0 and prediction.traffic.device_to_host > 0
    assert prediction.busy_s["host-device link"] > 0
    assert prediction.peak_device_memory > device


def test_a_frozen_base_read_from_bf16_files_moves_half_its_chunk_bytes(tmp_path):
    """LoRA on a model directory: frozen chunks are fp32 on the CPU, their files bf16; the disk moves the files."""
    from finetune.cli.lora import wrap_lora

    model = wrap_lora(_meta_llama(tmp_path, num_hidden_layers=6), rank=4, alpha=8.0, dropout=0.0,
                      targets="all-linear", seed=0, base_name="test")
    plan = find_blocks(model)
    layouts = block_layouts(model, plan, None, torch.float32)
    device, host = offload.Engine.minimum_budget(model, optim.AdamW(lr=1e-3))
    reads = {
        dtype: simulate_traffic(layouts, plan, optim.AdamW(lr=1e-3), torch.float32, device_bytes=device,
                                host_bytes=host, nvme=True, shares_memory=True, updates_in_backward=True,
                                frozen_file_dtype=dtype).disk_read
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert 0 < reads[torch.bfloat16] < 0.8 * reads[torch.float32]  # the base is most of what is read (measured 72%)


def test_a_base_converted_from_bf16_costs_cpu_time_by_its_bytes(tmp_path):
    """Frozen chunks made from bf16 files are converted to fp32 on the read thread: each byte made costs
    1 / convert_rate of CPU time beside the compute; a base stored in the compute dtype is copied, not converted."""
    model = _lora(tmp_path, "all-linear")
    device, host = offload.Engine.minimum_budget(model, optim.AdamW(lr=1e-3))
    machine = Machine("cpu", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9)
    kept = {"device_budget": device, "host_budget": host, "nvme": True, "compute_dtype": torch.float32}

    def predicted(file_dtype: torch.dtype, rate: float) -> offload.Prediction:
        workload = Workload(batch_size=2, seq_len=16, updates_in_backward=True, frozen_file_dtype=file_dtype)
        return predict(model, optim.AdamW(lr=1e-3), workload, dataclasses.replace(machine, convert_rate=rate), **kept)

    slow, fast = predicted(torch.bfloat16, 1e9), predicted(torch.bfloat16, 2e9)
    assert slow.traffic.converted > 0  # the base streams (a minimum budget): read and converted every step
    assert slow.busy_s["compute"] - fast.busy_s["compute"] == pytest.approx(slow.traffic.converted / 2e9)
    assert predicted(torch.float32, 1.0).traffic.converted == 0


def test_the_swap_the_replay_fills_is_what_the_engine_checks_the_disk_for(tmp_path):
    """The engine's disk check (floors.check_budget) counts every chunk but the gradients when each is consumed by
    its update inside backward, all of them otherwise. At the minimum budget every chunk the replay may write is
    evicted at least once, so its swap files hold exactly that. bf16-stored MeZO weights: about half the fp32
    ones."""
    from finetune.offload.block_layout import compute_copies_nbytes
    from finetune.offload.floors import model_floors

    model = _meta_llama(tmp_path, num_hidden_layers=6)
    plan = find_blocks(model)
    layouts = block_layouts(model, plan, None, torch.float32)

    def swap(optimizer, **options) -> tuple[int, object]:
        need = model_floors(model, optimizer, torch.float32, None)
        room = need.device - compute_copies_nbytes(layouts, plan, optimizer, torch.float32)  # the engine store.s room
        traffic = simulate_traffic(layouts, plan, optimizer, torch.float32, device_bytes=room,
                                   host_bytes=need.host, nvme=True, shares_memory=True, **options)
        return traffic.swap_bytes, need

    consumed, need = swap(optim.AdamW(lr=1e-3), updates_in_backward=True)
    kept, _ = swap(optim.AdamW(lr=1e-3), updates_in_backward=True, accumulation_steps=2)
    assert need.grads > 0
    assert consumed == need.state - need.grads
    assert kept == need.state
    fp32, mezo = swap(optim.MeZO())
    bf16, mezo_bf16 = swap(optim.MeZO(storage_dtype=torch.bfloat16))
    assert 0 < fp32 <= mezo.state and 0 < bf16 <= mezo_bf16.state  # MeZO's held embedding may never leave
    assert bf16 == pytest.approx(fp32 / 2, rel=0.1)


def _lora(tmp_path, targets: str, layers: int = 4):
    from finetune.cli.lora import wrap_lora

    return wrap_lora(_meta_llama(tmp_path, num_hidden_layers=layers), rank=4, alpha=8.0, dropout=0.0,
                     targets=targets, seed=0, base_name="test")


def test_lora_adapters_cost_compute_time_by_count(tmp_path):
    """Each peft LoRA module costs `adapter_overhead_s` per micro-batch beyond its FLOPs (measured in rates.py),
    and peft's modules add `peft_rss` to the process."""
    machine = Machine("test", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9, baseline_rss=2**28,
                      adapter_overhead_s=1e-3, peft_rss=2**26)
    optimizer = optim.AdamW(lr=1e-3)
    every, one = _lora(tmp_path / "a", "all-linear"), _lora(tmp_path / "b", "q_proj")
    assert (lora_modules(every), lora_modules(one)) == (4 * 7, 4)  # Llama: 7 projections a layer
    assert lora_modules(_meta_llama(tmp_path / "c")) == 0
    workload = Workload(batch_size=2, seq_len=16, accumulation_steps=2, frozen_file_dtype=torch.float32)
    kept = {"device_budget": 2**30, "host_budget": 2**30, "nvme": False, "compute_dtype": torch.float32}
    many, few = (predict(model, optimizer, workload, machine, **kept) for model in (every, one))
    flops = (many.flops - few.flops) / machine.flops
    assert many.busy_s["compute"] - few.busy_s["compute"] == pytest.approx(flops + 24 * 2 * 1e-3)  # 2 micro-batches
    bare = predict(every, optimizer, workload, dataclasses.replace(machine, peft_rss=0), **kept)
    assert many.peak_rss - bare.peak_rss == 2**26


def test_qlora_dequantization_time_is_its_bytes_over_the_rate(tmp_path):
    """Every quantized layer is dequantized into compute-dtype weights at each hold: forward and backward, per
    micro-batch. On CUDA the GPU does it (bitsandbytes), so it is the GPU's compute time there too."""
    model = _lora(tmp_path, "all-linear")
    layouts = block_layouts(model, find_blocks(model), "nf4", torch.float32)
    layer = max(b.frozen.nbytes(torch.float32) for b in layouts if b.quantized is not None)
    workload = Workload(batch_size=2, seq_len=16, accumulation_steps=3, quantize_frozen="nf4")
    assert dequantized_bytes(layouts, workload, torch.float32) == 2 * 3 * 4 * layer  # 2 holds, 3 micro, 4 layers
    for machine in (Machine("cpu", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9),
                    offload.hardware_profile("h200-128gb")):
        dtype = torch.bfloat16 if machine.cuda else torch.float32
        nbytes = dequantized_bytes(block_layouts(model, find_blocks(model), "nf4", dtype), workload, dtype)
        busy = [predict(model, optim.AdamW(lr=1e-3), workload, dataclasses.replace(machine, dequantize_rate=rate),
                        device_budget=2**30, host_budget=2**30, nvme=False, compute_dtype=dtype).busy_s["compute"]
                for rate in (1e9, 2e9)]
        assert busy[0] - busy[1] == pytest.approx(nbytes / 2e9), machine.name
    plain = predict(model, optim.AdamW(lr=1e-3), dataclasses.replace(workload, quantize_frozen=None),
                    Machine("cpu", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9, dequantize_rate=1.0),
                    device_budget=2**30, host_budget=2**30, nvme=False, compute_dtype=torch.float32)
    assert plain.busy_s["compute"] < 1  # not quantized: nothing dequantized, however slow the rate


def test_mezo_draws_cost_compute_time_by_weight_count(tmp_path):
    """MeZO draws z for every weight at each perturbed pass (numel / perturb_rate each), and its update rewrites
    every weight at the measured rate of its storage dtype, each sample beyond the first one draw more."""
    model = _meta_llama(tmp_path)
    layouts = block_layouts(model, find_blocks(model), None, torch.float32)
    numel = sum(b.trainable.numel for b in layouts)
    machine = Machine("cpu", flops=1e11, disk_read=2e9, disk_write=1e9, optimizer_rate=4e9)
    kept = {"device_budget": 2**30, "host_budget": 2**30, "nvme": False, "compute_dtype": torch.float32}
    workload = Workload(batch_size=2, seq_len=16)

    def compute(optimizer, **rates: float) -> float:
        return predict(model, optimizer, workload, dataclasses.replace(machine, **rates), **kept).busy_s["compute"]

    bf16 = optim.MeZO(storage_dtype=torch.bfloat16)
    for optimizer, draws in ((optim.MeZO(), 2), (optim.MeZO(samples=2), 5), (bf16, 2)):
        assert compute(optimizer, perturb_rate=1e8) - compute(optimizer, perturb_rate=2e8) == pytest.approx(
            draws * numel / 2e8)
    for dtype, field in ((torch.float32, "mezo_update_rate"), (torch.bfloat16, "mezo_update_rate_bf16")):
        mezo = optim.MeZO(storage_dtype=dtype)
        assert compute(mezo, **{field: 1e8}) - compute(mezo, **{field: 2e8}) == pytest.approx(numel / 2e8)
    adamw = optim.AdamW(lr=1e-3)
    assert compute(adamw, perturb_rate=1.0) == pytest.approx(compute(adamw, perturb_rate=1e9))
