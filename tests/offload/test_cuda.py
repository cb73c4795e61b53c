"""The CUDA path, on a machine with a GPU (skipped elsewhere; benchmarks/gpu_check.sh runs these there): pinned host
buffers, the copy stream and its events, kvikio where it is installed, the engine computing on the GPU with every
chunk through NVMe (fp32 against plain PyTorch on the same GPU, bf16 against fp32; the vertical schedule and
speculative clipping too), and a checkpoint in swap resumed on the GPU.

References: plain PyTorch on the same device with the same kernels (TF32 off), so fp32 results agree to float
rounding (the engine's reductions run in the same order; only cuBLAS's choice of algorithm per shape could
differ), and the CPU tests' bit-equality stays the standard there.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload.chunks import Tier
from finetune.offload.device import make_transport
from finetune.offload.nvme import open_backend
from finetune.offload.store import ChunkStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
LR = 1e-3


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_host_buffers_are_pinned_and_copies_round_trip():
    transport = make_transport(CUDA)
    host = transport.allocate(1 << 20, on_device=False)
    device = transport.allocate(1 << 20, on_device=True)
    assert host.is_pinned() and device.device.type == "cuda"
    source = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    host.copy_(source)
    transport.ready(transport.copy(device, host))  # host -> device on the copy stream, waited for by an event
    host.zero_()
    transport.ready_on_host(transport.copy(host, device))
    assert torch.equal(host, source)


def test_chunks_spill_through_host_to_nvme_and_come_back(tmp_path):
    """Device budget of one chunk, host of one: the third chunk pushes the first down to its swap file."""
    numel = 1 << 16
    with open_backend(tmp_path / "swap") as backend:
        store = ChunkStore(numel * 4, numel * 4, make_transport(CUDA), backend)
        chunks = [store.create(f"c{i}", numel, torch.float32, numel * 4) for i in range(3)]
        values = [torch.randn(numel, device=CUDA) for _ in chunks]
        for chunk, value in zip(chunks, values):
            store.acquire(chunk, Tier.DEVICE).copy_(value)
            store.release(chunk, Tier.DEVICE, dirty=True)
        for chunk, value in zip(chunks, values):
            assert torch.equal(store.acquire(chunk, Tier.DEVICE), value)
            store.release(chunk, Tier.DEVICE)
        assert store.bytes_written > 0 and store.bytes_read > 0
        store.close()


def test_kvikio_backend_round_trips_device_memory(tmp_path):
    pytest.importorskip("kvikio")
    from finetune.offload.kvikio_backend import KvikioBackend

    with KvikioBackend(tmp_path / "swap") as backend:
        file = backend.open("chunk", 1 << 20)
        data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device=CUDA)
        file.write_from(data).result()
        back = torch.empty_like(data)
        file.read_into(back).result()
        assert torch.equal(back, data)


def _batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(128, batch=4, seq=32, generator=generator) for _ in range(count)]


def _plain_cuda(path, batches, accumulation: int = 1, max_grad_norm: float | None = None
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(path).to(CUDA)
    adamw = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for batch in batches:
        micro = []
        for values in zip(*(v.chunk(accumulation) for v in batch.values())):
            loss = model(**{k: v.to(CUDA) for k, v in zip(batch, values)}).loss
            (loss / accumulation).backward()
            micro.append(loss.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        adamw.step()
        adamw.zero_grad()
        losses.append(torch.stack(micro).mean().item())
    return losses, {name: p.detach().cpu() for name, p in model.named_parameters()}


def _engine(path, swap, compute_dtype: torch.dtype, **options) -> offload.Engine:
    model = AutoModelForCausalLM.from_pretrained(path)
    adamw = optim.AdamW(lr=LR, weight_decay=0.0)
    device, host = offload.Engine.minimum_budget(model, adamw, compute_dtype=compute_dtype)
    budget = offload.Budget(device=device, host=host, nvme=swap)
    return offload.Engine(model, adamw, budget, device=CUDA, compute_dtype=compute_dtype, **options)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_on_cuda_through_nvme_equals_plain_pytorch_on_cuda(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=1)
    batches = _batches(int(torch.randint(0, 2**31, ())), 4)
    expected_losses, expected = _plain_cuda(path, batches)
    with _engine(path, tmp_path / "swap", torch.float32) as engine:
        losses = [engine.train_step(b) for b in batches]
        assert engine.stats()["bytes_written"] > 0  # everything went through NVMe
        engine.export(tmp_path / "out")
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_vertical_schedule_and_speculative_clipping_on_cuda_equal_plain_pytorch_on_cuda(tmp_path):
    """Accumulation 2 with the vertical schedule (micro-batch threads in forward, backward driven per layer on the
    CUDA autograd threads) and exact clipping whose steps are all clipped (rolled back and run again)."""
    path = save_tiny_model("llama", tmp_path / "model", seed=2)
    batches = _batches(int(torch.randint(0, 2**31, ())), 3)
    expected_losses, expected = _plain_cuda(path, batches, accumulation=2, max_grad_norm=1e-2)
    with _engine(path, tmp_path / "swap", torch.float32, accumulation_steps=2, max_grad_norm=1e-2) as engine:
        assert engine.vertical
        losses = [engine.train_step(b) for b in batches]
        assert engine.stats()["redone_steps"] == len(batches)
        engine.export(tmp_path / "out")
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_compute_on_cuda_follows_fp32(tmp_path):
    """bf16 weights in compute, fp32 masters: the losses track the fp32 run's within bf16's rounding."""
    path = save_tiny_model("llama", tmp_path / "model", seed=2)
    batches = _batches(3, 4)
    with _engine(path, tmp_path / "a", torch.float32) as engine:
        fp32 = [engine.train_step(b) for b in batches]
    with _engine(path, tmp_path / "b", torch.bfloat16) as engine:
        bf16 = [engine.train_step(b) for b in batches]
        assert all(state.master is not None for state in engine.blocks if state.trainable)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=2e-2)


def test_a_checkpoint_in_swap_resumes_exactly_on_cuda(tmp_path):
    path = save_tiny_model("qwen2", tmp_path / "model", seed=4)
    batches = _batches(5, 5)
    with _engine(path, tmp_path / "swap-a", torch.bfloat16) as engine:
        uninterrupted = [engine.train_step(b) for b in batches]
    with _engine(path, tmp_path / "swap", torch.bfloat16, run_name="run") as engine:
        first = [engine.train_step(b) for b in batches[:2]]
        engine.save_checkpoint(tmp_path / "checkpoint")
    with _engine(path, tmp_path / "swap", torch.bfloat16, run_name="run",
                 checkpoints=[tmp_path / "checkpoint"]) as engine:
        engine.load_checkpoint(tmp_path / "checkpoint")
        rest = [engine.train_step(b) for b in batches[2:]]
    assert first + rest == uninterrupted
