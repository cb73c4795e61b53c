"""LoRA through the engine: a frozen base streamed read-only from its own safetensors, adapters trained.

Reference: the same peft model (same seed, so the same adapter init) trained in memory with torch.optim.AdamW,
fp32. The engine runs at its minimum budget, below a quarter of the base weights, so every frozen block is read
from the model's files again each time it is needed; none of it is ever written to the swap directory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from tiny_models import random_batch, save_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload.frozen import SafetensorsSource, tensor_ranges
from finetune.offload.nvme import ThreadPoolBackend
from finetune.optim.layout import ChunkLayout

peft = pytest.importorskip("peft")

LR, WEIGHT_DECAY, STEPS = 1e-2, 0.1, 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS}


def _lora_model(path, *, meta: bool = False) -> torch.nn.Module:
    """The peft model. meta=True: the base is built on the meta device (weights only in the files), the adapters
    created there too and then materialised; their init is re-drawn, so compare with the same on a real base."""
    if meta:
        with init_empty_weights(include_buffers=False):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    else:
        base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(7)  # the adapters' init: the same in the engine and the reference
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    if meta:
        _materialise_adapters(model)
    return model


def _materialise_adapters(model: torch.nn.Module) -> None:
    torch.manual_seed(11)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name in module.active_adapters:
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=4, seq=16, generator=generator) for _ in range(STEPS)]


def _reference(path, batches, *, fresh_adapters: bool = False) -> tuple[torch.nn.Module, list[float]]:
    model = _lora_model(path)
    if fresh_adapters:
        _materialise_adapters(model)
    return model, _train_in_memory(model, batches)


def _train_in_memory(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """The reference: torch.optim.AdamW on the trainable parameters, in memory; the losses."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "arch, from_files",
    [("llama", True), ("qwen2", True), ("llama", False)],  # untied and tied (frozen) embeddings; base in the module
)
def test_lora_on_streamed_base_equals_in_memory_peft(arch, from_files, tmp_path):
    """from_files=False: no model directory, the frozen chunks are copied from the module (and swapped out once)."""
    path = save_tiny_model(arch, tmp_path / "base", seed=0, num_hidden_layers=24)
    batches = _batches(seed=len(arch))
    reference, ref_losses = _reference(path, batches)

    model = _lora_model(path)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adamw = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    device, host = offload.Engine.minimum_budget(model, adamw)
    assert device + host < base_bytes / 4, (device, host, base_bytes)
    swap = tmp_path / "swap"
    budget = offload.Budget(device=device, host=host, nvme=swap)
    engine = offload.Engine(model, adamw, budget, weights=path if from_files else None, device="cpu")
    try:
        losses = [engine.train_step(batch) for batch in batches]
        frozen_bytes = sum(s.frozen.nbytes for s in engine.blocks if s.frozen is not None)
        assert frozen_bytes >= base_bytes
        stats = engine.stats()
        assert stats["bytes_read"] > STEPS * frozen_bytes, stats  # the base really streams, every step
        if from_files:
            # No base-weight bytes go to the swap directory: every swap file is an adapter chunk's (at this budget
            # the adapters' weights, gradients and states spill too), and no frozen chunk was ever dirty.
            files = sorted(f.name for f in engine.swap_directory.iterdir() if f.name != ".lock")  # KEY.ROLE.VERSION
            assert files and all(f.rsplit(".", 2)[-2] in {"weights", "grads", "exp_avg", "exp_avg_sq"} for f in files)
            assert all(s.frozen.dirty is None and s.frozen.source is not None for s in engine.blocks if s.frozen)
            adapter_bytes = sum(c.nbytes for s in engine.blocks for c in [s.weights, s.grads, *s.states.values()])
            assert stats["bytes_written"] <= 2 * STEPS * adapter_bytes, stats

        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-6)
        adapter = engine.save_adapter(tmp_path / "adapter")
        assert {f.name for f in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), adapter)
        expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
        trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
        assert trained.keys() == expected.keys()
        difference = max((trained[n] - expected[n]).abs().max().item() for n in expected)
        assert difference <= 1e-6, difference

        engine.model.eval()
        loaded.eval()
        with torch.no_grad():
            streamed = engine.model(**batches[0], use_cache=False).logits
            from_adapter = loaded(**batches[0], use_cache=False).logits
        torch.testing.assert_close(from_adapter, streamed, rtol=0, atol=1e-5)
    finally:
        engine.close()


def test_lora_on_a_meta_base_equals_in_memory_peft(tmp_path):
    """The base built on the meta device: nothing of it is in memory until a block is read from the files."""
    path = save_tiny_model("llama", tmp_path / "base", seed=0, num_hidden_layers=4)
    batches = _batches(seed=3)[:3]
    _, ref_losses = _reference(path, batches, fresh_adapters=True)
    budget = offload.Budget(device="1MB", host="1MB", nvme=tmp_path / "swap")
    adamw = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    with offload.Engine(_lora_model(path, meta=True), adamw, budget, weights=path, device="cpu") as engine:
        losses = [engine.train_step(batch) for batch in batches]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-6)


def test_adapters_stay_in_memory_when_the_budget_has_room_for_them(tmp_path):
    """A budget of the minimum plus the adapters' chunks: the base blocks stream past, the adapters and their
    optimizer state are never evicted, so nothing at all is written to the swap directory."""
    path = save_tiny_model("llama", tmp_path / "base", seed=0, num_hidden_layers=24)
    optimizer = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    device, host = offload.Engine.minimum_budget(_lora_model(path), optimizer)
    with offload.Engine(_lora_model(path), optimizer, offload.Budget(device=device, host=host, nvme=tmp_path / "probe"),
                        weights=path) as probe:
        adapter_bytes = sum(c.nbytes for s in probe.blocks for c in [s.weights, s.grads, *s.states.values()])
        frozen_bytes = sum(s.frozen.nbytes for s in probe.blocks if s.frozen is not None)
    budget = offload.Budget(device=device, host=host + adapter_bytes, nvme=tmp_path / "swap")
    with offload.Engine(_lora_model(path), optimizer, budget, weights=path, device="cpu") as engine:
        for batch in _batches(seed=4):
            engine.train_step(batch)
        stats = engine.stats()
    assert stats["bytes_written"] == 0, stats
    assert stats["bytes_read"] > 5 * frozen_bytes, stats  # the base did stream


@pytest.mark.parametrize("recompute", [True, False])
def test_qlora_equals_peft_on_a_bitsandbytes_4bit_base(recompute, tmp_path):
    """quantize_frozen="nf4" against the QLoRA recipe in memory: the base loaded with transformers'
    BitsAndBytesConfig(load_in_4bit=True, nf4) (bitsandbytes' Linear4bit layers), peft LoRA on it,
    torch.optim.AdamW; fp32 compute. The quantized layers are under a quarter of their fp32 bytes. Without
    recompute, backward finds its saved weights in the layer's dequantized buffer of a later hold.

    Every nn.Linear's in_features is a multiple of the blocksize (64): bitsandbytes' CPU AVX-512 4-bit
    dequantization (0.49 and later, the kernel Linear4bit's forward calls) takes a row's absmax as if every row
    began a block, so on such a CPU it dequantizes rows shorter than a block, or not a multiple of one, with other
    blocks' absmax (the scalar, NEON and CUDA kernels index the blocks of the flat tensor, as NF4 is defined)."""
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    path = save_tiny_model("llama", tmp_path / "base", seed=0, num_hidden_layers=24, hidden_size=64,
                           intermediate_size=128)
    batches = _batches(seed=9)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(7)
    reference = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    # The reference computes with NF4 as defined: each weight its code's level times its (flat) block's absmax.
    functional, nf4 = bitsandbytes.functional, bitsandbytes.functional.get_4bit_type("nf4", device="cpu")
    for name, module in reference.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            state, packed = module.weight.quant_state, module.weight.data.view(-1)
            levels = nf4[torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()]
            defined = (levels.view(-1, 64) * state.absmax.view(-1, 1)).view(state.shape)
            assert torch.equal(functional.dequantize_4bit(module.weight.data, state), defined), name
    ref_losses = _train_in_memory(reference, batches)

    model = _lora_model(path)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    optimizer = optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    device, host = offload.Engine.minimum_budget(model, optimizer, quantize_frozen="nf4")
    assert device + host < base_bytes / 4, (device, host, base_bytes)
    budget = offload.Budget(device=device, host=host, nvme=tmp_path / "swap")
    with offload.Engine(model, optimizer, budget, weights=path, quantize_frozen="nf4", device="cpu",
                        activations="recompute" if recompute else "keep") as engine:
        quantized = [s for s in engine.blocks if s.quantized is not None]
        assert len(quantized) == 24  # every decoder layer; the embedding and head stay fp32
        stored = sum(s.frozen.nbytes for s in quantized)
        fp32 = sum(s.frozen_layout.nbytes(torch.float32) for s in quantized)
        assert stored < fp32 / 4, (stored, fp32)  # about 1/7, less the page padding of these tiny layers
        losses = [engine.train_step(batch) for batch in batches]
        with torch.no_grad():
            engine.model.eval()
            streamed = engine.model(**batches[0], use_cache=False).logits
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-6)
    # In train mode (no dropout here): in eval mode bitsandbytes' Linear4bit on CPU repacks its weights for a bf16
    # inference kernel.
    expected = reference(**batches[0], use_cache=False).logits.detach()
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-5)


def _adapter_state(engine: offload.Engine, directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(engine.save_adapter(directory) / "adapter_model.safetensors")


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "in-swap"])
def test_resume_from_an_adapter_checkpoint_equals_an_uninterrupted_run(portable, tmp_path):
    """The checkpoint holds the adapter and its optimizer state, not the base (portable: as a peft adapter
    directory; in swap: only references to the adapter chunks' swap files); the resumed run's adapter is equal
    (torch.equal) to the uninterrupted run's after the same steps."""
    path = save_tiny_model("llama", tmp_path / "base", seed=0, num_hidden_layers=4)
    batches = _batches(seed=5)
    budget = offload.Budget(device="1MB", host="1MB", nvme=tmp_path / "swap")
    checkpoint = tmp_path / "checkpoint"

    def engine(**options: object) -> offload.Engine:
        return offload.Engine(_lora_model(path), optim.AdamW(lr=LR, weight_decay=WEIGHT_DECAY), budget, weights=path,
                              device="cpu", **options)

    with engine() as uninterrupted:
        for batch in batches:
            uninterrupted.train_step(batch)
        expected = _adapter_state(uninterrupted, tmp_path / "expected")
    with engine(run_name="run") as first:
        for batch in batches[:2]:
            first.train_step(batch)
        first.save_checkpoint(checkpoint, extra={"step": 2}, portable=portable)
    saved = {f.name for f in checkpoint.iterdir()}
    if portable:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= saved, saved
        assert not any(name.startswith("model") or name == "config.json" for name in saved), saved
    else:
        assert saved == {"engine_state.pt", "checksums.json"}
        versions = {f.name for f in (tmp_path / "swap" / "finetune-run").iterdir()} - {".lock"}
        assert versions and not any(".frozen." in name for name in versions)  # the base is never in swap
    with engine(run_name="run", checkpoints=[checkpoint]) as resumed:
        assert resumed.load_checkpoint(checkpoint) == {"step": 2}
        for batch in batches[2:]:
            resumed.train_step(batch)
        trained = _adapter_state(resumed, tmp_path / "resumed")
    assert trained.keys() == expected.keys()
    assert all(torch.equal(trained[key], expected[key]) for key in expected)


@pytest.mark.parametrize("with_backend", [True, False])
def test_safetensors_source_reads_unaligned_ranges_and_converts_dtypes(with_backend, tmp_path):
    """Reference: the tensors as saved (bf16 ones converted with .float())."""
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),  # odd sizes: every later range starts unaligned
        "b": torch.randn(7),
        "c": torch.randn(300, 20),  # larger than one 4096-byte page
    }
    save_file(tensors, tmp_path / "model.safetensors")
    layout = ChunkLayout.from_shapes({name: t.shape for name, t in tensors.items()})
    ranges = tensor_ranges(list(tensors), {}, tmp_path)
    backend = ThreadPoolBackend(tmp_path / "swap", request_bytes=4096) if with_backend else None
    with ThreadPoolExecutor(1) as pool:
        source = SafetensorsSource(layout, ranges, torch.float32, backend, pool)
        buffer = torch.zeros(layout.nbytes(torch.float32), dtype=torch.uint8)
        source.read_into(buffer).result()
    flat = buffer.view(torch.float32)
    for slot, (name, tensor) in zip(layout.slots, tensors.items()):
        assert torch.equal(slot.view(flat), tensor.float()), name
    if backend is not None:
        backend.close()


@pytest.mark.parametrize("piece", [None, 1000], ids=["whole-tensors", "in-pieces"])
def test_a_chunk_read_in_another_dtype_keeps_few_temporaries(tmp_path, monkeypatch, piece):
    """frozen.CONVERTING: the bf16 bytes of a whole chunk are never held beside it at once (a 13B layer's are
    0.6 GB), only those of the pieces being read and converted, each at most CONVERT_PIECE bytes (`piece`: so
    small that every tensor takes five, the last one partial); every tensor still lands converted."""
    import weakref

    from finetune.offload import frozen

    if piece is not None:
        monkeypatch.setattr(frozen, "CONVERT_PIECE", piece)

    tensors = {f"w{i}": torch.randn(64, 33).to(torch.bfloat16) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")
    layout = ChunkLayout.from_shapes({name: t.shape for name, t in tensors.items()})
    alive: list[weakref.ref] = []
    sizes: list[int] = []
    most = [0]
    real_empty = torch.empty

    def tracked_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        alive.append(weakref.ref(tensor))
        sizes.append(tensor.numel() * tensor.element_size())
        most[0] = max(most[0], sum(1 for ref in alive if ref() is not None))
        return tensor

    monkeypatch.setattr(frozen.torch, "empty", tracked_empty)
    with ThreadPoolExecutor(1) as pool:
        source = SafetensorsSource(layout, tensor_ranges(list(tensors), {}, tmp_path), torch.float32, None, pool)
        buffer = real_empty(layout.nbytes(torch.float32), dtype=torch.uint8)
        source.read_into(buffer).result()
    assert 1 <= most[0] <= frozen.CONVERTING
    assert max(sizes) <= frozen.CONVERT_PIECE
    flat = buffer.view(torch.float32)
    for slot, (name, tensor) in zip(layout.slots, tensors.items()):
        assert torch.equal(slot.view(flat), tensor.float()), name


def test_nf4_tensors_dequantize_in_pieces_to_the_same_bits(monkeypatch):
    """A quantized tensor with a partial last block, dequantized in pieces of 128 values (so the last piece ends
    in that block): equal to the bit to bitsandbytes' dequantization of the tensor whole."""
    import bitsandbytes.functional as functional

    from finetune.offload import quantized

    shapes = {"proj.weight": torch.Size([40, 33]), "norm.weight": torch.Size([33])}  # 1320 values: 20.6 blocks
    layout = ChunkLayout.from_shapes(shapes)
    nf4 = quantized.QuantizedLayout(layout, frozenset({"proj.weight"}), torch.float32)
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(shape, generator=generator) for shape in shapes.values()]
    buffer = torch.zeros(nf4.nbytes, dtype=torch.uint8)
    nf4.quantize_into(buffer, tensors)
    monkeypatch.setattr(quantized, "DEQUANTIZE_PIECE", 128)
    flat = torch.full((layout.nbytes(torch.float32) // 4,), float("nan"))
    nf4.dequantize_into(buffer, flat)
    codes, state = functional.quantize_4bit(tensors[0], blocksize=64, quant_type="nf4")
    proj, norm = layout.views(flat)
    assert torch.equal(proj, functional.dequantize_4bit(codes, state)) and torch.equal(norm, tensors[1])
