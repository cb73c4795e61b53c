"""What a run will cost before a byte is written: memory per tier and outside the budget, disk, bytes moved per
step on each link, and the step time with its bottleneck.

Inputs are a model on the meta device (shapes only), the optimizer, the workload (batch, sequence, accumulation,
recompute, prefetch depth), the tier budgets, and a `Machine`: rates measured here (`offload/rates.py`) or a
hardware profile's. Bytes come from `traffic.simulate_traffic`, which runs the engine's chunk traffic through the
real store's eviction policy, so they are what the engine will move, not a formula's guess. Time is each
resource's busy time from those bytes and the FLOPs of the step, combined by what overlaps with what:

- CUDA: the GPU computes while the copy engine, the disks and the CPU (optimizer math) work in parallel, so a
  step takes the longest of the four, plus what cannot overlap: the first block's load and the last update.
- CPU: compute and optimizer math share the same cores, so they add; disk reads and writes run beside them.

Either way the compute also waits for the loads its prefetch depth cannot hide (load_stall.py): "load wait".
Compute time is FLOPs at the measured rate plus what a step spends beyond them: the engine's cost per block,
peft's per LoRA adapter, and QLoRA's dequantization of each quantized layer every time it is held (on the CPU,
or with CUDA on the GPU, where bitsandbytes dequantizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..optim.layout import chunk_nbytes
from ..optim.mezo import MeZO
from .block_layout import block_layouts, chunk_specs, compute_copies_nbytes
from .blocks import find_blocks
from .embedding_grad import shared_parameters, takes_row_gradient
from .floors import Floors, floors
from .frozen import CONVERT_PIECE, CONVERTING
from .head_grad import takes_direct_gradient
from .load_stall import load_wait, prefetch_bytes, prefetch_fits, step_holds, update_reads
from .model_export import is_peft
from .traffic import Traffic, simulate_traffic

__all__ = ["Machine", "Prediction", "Workload", "activation_bytes", "dequantized_bytes", "lora_modules", "predict",
           "step_flops"]

GiB = 2**30


@dataclass(frozen=True)
class Machine:
    """The rates a prediction needs, in bytes and FLOP per second (measured, or from a hardware profile)."""

    name: str
    flops: float  # achieved FLOP/s of the compute device in the compute dtype, on the model's matrix shapes
    disk_read: float  # swap directory, O_DIRECT, all its disks together
    disk_write: float
    optimizer_rate: float  # bytes of update state (weights, gradients, masters, states) the host updates per second
    update_rate: float | None = None  # parameters a second the run's own optimizer updates (measured); None: bytes
    # Of the disk's busy time, the fraction CPU compute runs beside at full speed (rates._io_overlap): 1 where they
    # do not contend; on this project's 2-vCPU CI VM 0.20-0.55 (the hypervisor's I/O takes the cores' time).
    io_overlap: float = 1.0
    host_to_device: float | None = None  # None: device and host are the same RAM (CPU)
    ram: int | None = None  # host RAM
    device_memory: int | None = None  # GPU memory (None on CPU)
    baseline_rss: int = 512 * 2**20  # the process before any chunk: interpreter, torch, transformers, the engine
    block_overhead_s: float = 0.0  # the engine's fixed cost per block and step (hooks, holds, bookkeeping)
    adapter_overhead_s: float = 0.0  # per LoRA adapter module and micro-batch, beyond its FLOPs (peft, its update)
    peft_rss: int = 0  # what a peft model's process holds beyond a plain one's (peft's modules)
    dequantize_rate: float = 1.0e9  # bytes of compute-dtype weights NF4 dequantization writes per second (QLoRA)
    convert_rate: float = 1.0e10  # bytes of compute-dtype weights per second made from a bf16 file's (LoRA's base)
    perturb_rate: float = 1.0e9  # MeZO: weights per second z is drawn for and applied (one thread: a seeded draw)
    mezo_update_rate: float = 1.0e9  # MeZO: weights per second its update rewrites, stored in fp32
    mezo_update_rate_bf16: float = 1.0e9  # ... stored in bf16 (stochastic rounding draws once more)

    @property
    def cuda(self) -> bool:
        return self.host_to_device is not None


@dataclass(frozen=True)
class Workload:
    """What one optimizer step computes, and the engine settings that change its traffic."""

    batch_size: int = 1
    seq_len: int = 512
    accumulation_steps: int = 1
    recompute: bool = True
    prefetch: int = 2
    updates_in_backward: bool = False  # per-block clipping or none: updates overlap backward
    speculative: bool = False  # exact clipping with a swap directory: updates in backward, validated after it
    frozen_file_dtype: torch.dtype | None = None  # LoRA on a model directory: the dtype the frozen base is read in
    quantize_frozen: str | None = None
    vertical: bool = False  # the vertical schedule (vertical.py): each block runs every micro-batch while held

    @property
    def holds_per_pass(self) -> int:
        """How often each block is held in each of forward and backward per step: once per micro-batch, or once
        with the vertical schedule (whose traffic is then one micro-batch's)."""
        return 1 if self.vertical else self.accumulation_steps

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step."""
        return self.batch_size * self.seq_len * self.accumulation_steps


@dataclass(frozen=True)
class Prediction:
    """A run's predicted costs. Bytes per step are the steady state (from the second step on)."""

    floors: Floors
    device_budget: int
    host_budget: int
    traffic: Traffic
    outside_budget: dict[str, int]  # memory the budgets do not count, by what holds it
    peak_rss: int  # host process memory at the most
    peak_device_memory: int  # GPU memory at the most (CUDA; on CPU the same RAM as peak_rss)
    flops: float  # per optimizer step
    busy_s: dict[str, float] = field(default_factory=dict)  # each resource's busy time per step
    step_s: float = 0.0
    bottleneck: str = ""
    tokens_per_step: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s else 0.0


def _config(model: nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _linear_numel(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def step_flops(model: nn.Module, workload: Workload, zeroth_order: bool, samples: int = 1) -> tuple[float, float]:
    """(FLOPs of the decoder layers, FLOPs of the output layer) for one optimizer step.

    A matrix product of n weights costs 2n FLOPs per token forward and 4n backward (input and weight
    gradients), 2n for a frozen weight (input gradient only); attention adds 4 * seq * width per token and
    layer forward. Recompute runs each layer's forward a second time. MeZO runs 2 * samples forwards."""
    config = _config(model)
    plan = find_blocks(model)
    layers = [b for b in plan.blocks if b.is_layer]
    layer_module = model.get_submodule(plan.layers_name)[0]
    linear = _linear_numel(layer_module) * len(layers)
    trainable = sum(p.numel() for b in layers for p in b.params.values() if p.requires_grad and p.dim() >= 2)
    frozen_linear = max(linear - trainable, 0)
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention = 4 * workload.seq_len * width * len(layers)
    head = model.get_output_embeddings()
    head_numel = head.weight.numel() if head is not None else 0
    tokens = workload.tokens
    forward = 2 * linear + attention
    if zeroth_order:
        passes = 2 * samples
        return passes * forward * tokens, passes * 2 * head_numel * tokens
    backward = 4 * (linear - frozen_linear) + 2 * frozen_linear + 2 * attention
    recompute = forward if workload.recompute else 0
    head_trainable = head is not None and head.weight.requires_grad
    head_flops = (2 + (4 if head_trainable else 2)) * head_numel
    return (forward + backward + recompute) * tokens, head_flops * tokens


def activation_bytes(model: nn.Module, workload: Workload, compute_dtype: torch.dtype, zeroth_order: bool,
                     samples: int = 1, device: torch.device = torch.device("cpu")) -> dict[str, int]:
    """Memory outside the budgets for one micro-batch, by what holds it.

    Per layer and token, a decoder layer's backward keeps about 10 hidden-width and 4 intermediate-width
    tensors (norm outputs, q/k/v, attention output, MLP inputs and products), plus the attention probabilities
    per head. With recompute only each layer's input is kept, and one layer's full set exists at a time. The
    logits are float32, with their softmax and gradient beside them (MeZO: one perturbed tensor too). A trained
    embedding's gradient is a dense vocab x hidden temporary, unless it is added into its chunk row by row
    (embedding_grad.py)."""
    config = _config(model)
    hidden, vocab = config.hidden_size, config.vocab_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    size = torch.empty((), dtype=compute_dtype).element_size()
    rows = workload.batch_size * (2 * samples if zeroth_order else 1)
    tokens = rows * workload.seq_len
    one_layer = (tokens * (10 * hidden + 4 * intermediate) + rows * heads * workload.seq_len**2) * size
    if zeroth_order:
        # One tensor's perturbed weights (drawn just before its module runs), or its z in the update: fp32.
        largest = max((p.numel() for p in model.parameters()), default=0)
        return {"activations": one_layer, "logits": tokens * vocab * 4, "perturbation": largest * 4}
    kept = layers * tokens * hidden * size + one_layer if workload.recompute else layers * one_layer
    if workload.vertical:  # every micro-batch's layer inputs, until the layer's backward
        kept += (workload.accumulation_steps - 1) * layers * tokens * hidden * size
    embedding = model.get_input_embeddings()
    shared = shared_parameters(model) if workload.accumulation_steps > 1 else set()  # tied: one Parameter
    rows = takes_row_gradient(embedding, shared, device)
    dense_grad = embedding.weight.numel() * size if embedding.weight.requires_grad and not rows else 0
    # Every other trained tensor's gradient is made whole by autograd, then added into its chunk and dropped: one at
    # a time, the largest of them beside the budget. A tied head is a Parameter of its own then
    # (binding.bind_parameters), a gradient of its own, unless it is written into the chunk (head_grad.py).
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    skip = set() if tied else {id(embedding.weight)}  # counted above
    if output is not None and takes_direct_gradient(output, shared, device, workload.accumulation_steps, compute_dtype):
        skip.add(id(output.weight))
    weight_grad = max((p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip), default=0)
    weight_grad *= size
    return {"activations": kept, "logits": 3 * tokens * vocab * 4, "embedding gradient": dense_grad,
            "weight gradient": weight_grad}


def predict(
    model: nn.Module,
    optimizer: Any,
    workload: Workload,
    machine: Machine,
    *,
    device_budget: int,
    host_budget: int,
    nvme: bool,
    compute_dtype: torch.dtype,
) -> Prediction:
    """The costs of training `model` (on the meta device) with `optimizer` under these budgets on `machine`."""
    zeroth_order = isinstance(optimizer, MeZO)
    samples = optimizer.samples if zeroth_order else 1
    plan = find_blocks(model)
    layouts = block_layouts(model, plan, workload.quantize_frozen, compute_dtype)
    need = floors(layouts, plan, optimizer, compute_dtype, workload.accumulation_steps)
    passes = workload.holds_per_pass
    dequantized = compute_copies_nbytes(layouts, plan, optimizer, compute_dtype)  # residency's Note [Compute copies]
    traffic = simulate_traffic(
        layouts, plan, optimizer, compute_dtype, device_bytes=device_budget - dequantized, host_bytes=host_budget,
        nvme=nvme, shares_memory=not machine.cuda, prefetch=workload.prefetch,
        accumulation_steps=passes, updates_in_backward=workload.updates_in_backward,
        speculative=workload.speculative,
        frozen_file_dtype=workload.frozen_file_dtype,
    )
    outside = activation_bytes(model, workload, compute_dtype, zeroth_order, samples,
                               torch.device("cuda" if machine.cuda else "cpu"))
    # What the chunks hold at the most, freed buffers kept for reuse included (the pool keeps what a tier used):
    # the replay's peaks, with the held compute copies (QLoRA, bf16 MeZO), which the device tier's budget sets aside.
    resident = traffic.peak_host + (0 if machine.cuda else traffic.peak_device + dequantized)
    # Host temporaries of frozen tensors read in another dtype than the chunk's (frozen.py): host memory on CUDA too.
    baseline = machine.baseline_rss + (machine.peft_rss if is_peft(model) else 0) + \
        conversion_bytes(layouts, workload, compute_dtype)
    peak_rss = baseline + resident + (0 if machine.cuda else sum(outside.values()))
    # CUDA device memory: what the chunks reach at the most (torch's allocator, not a pool kept up to the budget).
    peak_device = traffic.peak_device + sum(outside.values()) + dequantized if machine.cuda else peak_rss
    layer_flops, head_flops = step_flops(model, workload, zeroth_order, samples)
    flops = layer_flops + head_flops
    # A frozen base read from files in another dtype is converted on the read thread: CPU time, which competes with
    # the compute on a CPU and runs beside the GPU with CUDA.
    held_s = lora_modules(model) * machine.adapter_overhead_s * workload.accumulation_steps + \
        dequantized_bytes(layouts, workload, compute_dtype) / machine.dequantize_rate + \
        (0.0 if machine.cuda else traffic.converted / machine.convert_rate) + \
        mezo_update_s(optimizer, sum(b.trainable.numel for b in layouts), machine)
    busy = _busy_times(traffic, flops, layouts, optimizer, compute_dtype, machine, zeroth_order, held_s)
    holds = step_holds(plan, layouts, compute_dtype, layer_flops=layer_flops, head_flops=head_flops,
                       recompute=workload.recompute, zeroth_order=zeroth_order,
                       accumulation_steps=passes, file_ratio=_file_ratio(workload, compute_dtype))
    read_s = max(traffic.disk_read / machine.disk_read, busy.get("host-device link", 0.0))
    block = prefetch_bytes(layouts, compute_dtype, passes)
    depth = min(workload.prefetch, prefetch_fits(device_budget, need.device, block))  # the store drops the rest
    busy["load wait"] = load_wait(holds, read_s, busy["compute"], update_reads(layouts, optimizer, compute_dtype),
                                  depth, fixed_s=len(layouts) * machine.block_overhead_s)
    step_s, bottleneck = _step_time(busy, machine)
    return Prediction(need, device_budget, host_budget, traffic, outside, peak_rss, peak_device, flops, busy, step_s,
                      bottleneck, workload.tokens)


def conversion_bytes(layouts: list, workload: Workload, compute_dtype: torch.dtype) -> int:
    """The temporaries a frozen chunk's read from files stored in another dtype holds at once (the read thread reads
    one chunk at a time): `CONVERTING` of its largest tensors, in the file's dtype, each at most `CONVERT_PIECE`."""
    stored = workload.frozen_file_dtype
    if stored is None or stored == compute_dtype or workload.quantize_frozen is not None:
        return 0
    chunks = [sorted(min(slot.numel * stored.itemsize, CONVERT_PIECE) for slot in b.frozen.slots)[-CONVERTING:]
              for b in layouts if b.frozen is not None]
    return max((sum(largest) for largest in chunks), default=0)


def mezo_update_s(optimizer: Any, numel: int, machine: Machine) -> float:
    """Seconds per step MeZO spends on its per-weight passes (0 for others): z drawn and applied at each of the
    2 x samples perturbed passes (zeroth_order.py's Note [Perturbed one module at a time]), and the update, whose
    z for each sample beyond the first is one more draw."""
    if not isinstance(optimizer, MeZO):
        return 0.0
    update = machine.mezo_update_rate if optimizer.storage_dtype == torch.float32 else machine.mezo_update_rate_bf16
    return numel * ((3 * optimizer.samples - 1) / machine.perturb_rate + 1 / update)


def lora_modules(model: nn.Module) -> int:
    """How many layers of `model` carry a peft LoRA adapter (one LoraLayer around each adapted nn.Linear); 0
    for a model without peft. Each costs a run more than its FLOPs (`Machine.adapter_overhead_s`)."""
    if not is_peft(model):
        return 0
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def dequantized_bytes(layouts: list, workload: Workload, compute_dtype: torch.dtype) -> int:
    """Bytes of compute-dtype weights QLoRA's NF4 layers are dequantized into per step: each quantized layer
    every time it is held (residency.hold), once in forward and once in backward (for its recompute, or to remake
    its saved weight views), per micro-batch."""
    per_hold = sum(b.frozen.nbytes(compute_dtype) for b in layouts if b.quantized is not None)
    return 2 * per_hold * workload.holds_per_pass


def _file_ratio(workload: Workload, compute_dtype: torch.dtype) -> float:
    """Bytes of a frozen chunk's file per chunk byte (1 when the frozen chunks are not read from files)."""
    file_dtype = workload.frozen_file_dtype
    return file_dtype.itemsize / compute_dtype.itemsize if file_dtype is not None else 1.0


def _busy_times(traffic: Traffic, flops: float, layouts: list, optimizer: Any, compute_dtype: torch.dtype,
                machine: Machine, zeroth_order: bool, held_s: float = 0.0) -> dict[str, float]:
    """Seconds per step each resource is busy. `held_s`: compute beyond FLOPs and per-block costs (LoRA adapters,
    QLoRA's dequantization), which runs where the layer computes: the CPU, or the GPU with CUDA."""
    busy = {
        "compute": flops / machine.flops + len(layouts) * machine.block_overhead_s + held_s,
        "disk": traffic.disk_read / machine.disk_read + traffic.disk_write / machine.disk_write,
        "optimizer": _update_s(layouts, optimizer, compute_dtype, machine),
    }
    if machine.cuda:
        busy["host-device link"] = (traffic.host_to_device + traffic.device_to_host) / machine.host_to_device
    return busy


def _update_s(layouts: list, optimizer: Any, compute_dtype: torch.dtype, machine: Machine) -> float:
    """Seconds of the step's optimizer updates: the trained parameters at the optimizer's measured rate, else (a
    hardware profile) its state's bytes, read and written, at the machine's memory rate."""
    if machine.update_rate is not None and not isinstance(optimizer, MeZO):
        return sum(b.trainable.numel for b in layouts) / machine.update_rate
    update_bytes = 0
    for b in layouts:
        specs = chunk_specs(b.trainable, compute_dtype, optimizer).values()
        update_bytes += 2 * sum(chunk_nbytes(spec.numel, spec.dtype) for spec in specs)  # read and written
    return update_bytes / machine.optimizer_rate


def _step_time(busy: dict[str, float], machine: Machine) -> tuple[float, str]:
    """The step time from the busy times, and the resource that sets it ("load wait": compute waiting for loads
    that prefetch could not hide, when that outlasts every resource). On CPU the cores and the disk overlap only
    as far as `Machine.io_overlap` says."""
    waited = busy["compute"] + busy.get("load wait", 0.0)
    if machine.cuda:
        resources = {name: seconds for name, seconds in busy.items() if name != "load wait"}
        bottleneck = max(resources, key=resources.__getitem__)
        step = resources[bottleneck]
    else:
        cores = busy["compute"] + busy["optimizer"]  # one set of cores does both
        step, bottleneck = (busy["disk"], "disk") if busy["disk"] > cores else \
            (cores, "compute" if busy["compute"] >= busy["optimizer"] else "optimizer")
        # The shorter of the two runs beside the longer only as far as the disk's I/O leaves the cores alone.
        step += (1 - machine.io_overlap) * min(cores, busy["disk"])
    return (waited, "load wait") if waited > step else (step, bottleneck)
