"""Activation offload (offload/activations.py) equals plain in-memory PyTorch training to the bit.

Reference: test_engine.py's `_reference`, the same model loaded again and trained in memory with torch.optim.AdamW
(fp32), loss / accumulation per micro-batch. The engine runs at its minimum budget with a swap directory, so every
state chunk goes through NVMe, and with activations="offload" every saved tensor of every layer too: the tiny
models' tensors are far below `SMALL_BYTES`, so the tests lower it to 0, and a 16 KiB `activation_memory` makes
saves wait for writes and most reads happen on demand (the prefetch path runs with the default, which has room).
Nothing is recomputed, so dropout draws its masks once, in the forward, as in plain PyTorch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine import _batches, _engine, _reference, _train_and_export
from tiny_models import ARCHITECTURES, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.offload import activations
from finetune.offload.activation_choice import offload_pays
from finetune.offload.activation_mode import ActivationMode
from finetune.offload.nvme import ThreadPoolBackend


@pytest.fixture(autouse=True)
def _offload_every_tensor(monkeypatch):
    monkeypatch.setattr(activations, "SMALL_BYTES", 0)


def _parameters_equal(engine_dir, reference: torch.nn.Module) -> bool:
    exported = dict(AutoModelForCausalLM.from_pretrained(engine_dir).named_parameters())
    return all(torch.equal(exported[name], p) for name, p in reference.named_parameters())


def _check_exact(path, tmp_path, *, steps: int = 2, accumulation: int = 2, **options) -> dict[str, int]:
    """Train `path` with activations="offload" and in memory; assert losses and parameters are equal; the stats."""
    batches = _batches(vocab_size=128, seed=5, steps=steps)
    reference, ref_losses, _ = _reference(path, batches, accumulation=accumulation)
    torch.manual_seed(1234)  # the reference's seed: dropout draws the same masks
    engine = _engine(path, tmp_path, activations="offload", accumulation_steps=accumulation, **options)
    losses = _train_and_export(engine, batches, tmp_path / "out")
    assert losses == ref_losses
    assert _parameters_equal(tmp_path / "out", reference)
    stats = engine.stats()
    assert stats["activation_bytes_written"] > 0, "the activations must have gone to the swap directory"
    # Every byte written comes back: read, or served from memory when backward came before its write ended.
    assert stats["activation_bytes_read"] > 0
    assert stats["activation_bytes_read"] + stats["activation_bytes_unread"] == stats["activation_bytes_written"]
    assert stats["activation_bytes_held"] == 0, "every layer's tensors are let go of after its backward"
    return stats


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_offloaded_activations_equal_in_memory_adamw(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / "model", seed=3, num_hidden_layers=3)
    stats = _check_exact(path, tmp_path, activation_memory=16 * 1024)
    assert stats["bytes_written"] > 0, "the state must have gone through the NVMe tier too"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_dropout_is_exact_with_offloaded_activations(accumulation, tmp_path):
    """GPT-2 with dropout, prefetching with room (the default activation_memory): the masks of the forward are
    the ones backward uses, read back from the swap file."""
    path = save_tiny_model("gpt2", tmp_path / "model", seed=0, resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.2)
    stats = _check_exact(path, tmp_path, steps=3, accumulation=accumulation)
    assert stats["peak_activations"] <= offload.ACTIVATION_MEMORY


def test_offload_without_swap_directory_is_refused(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=r"activations='offload'.*Budget\(nvme=\.\.\.\)"):
        offload.Engine(model, optim.AdamW(lr=1e-3), offload.Budget(device="1GB", host="1GB"), activations="offload")


def test_unknown_mode_and_contradicting_alias_are_refused_and_the_alias_works(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    budget = offload.Budget(device="1GB", host="1GB", nvme=tmp_path / "swap")
    with pytest.raises(ValueError, match="activations='swap' is not one of"):
        offload.Engine(model, optim.AdamW(lr=1e-3), budget, activations="swap")
    with pytest.raises(ValueError, match="checkpoint_activations=False contradicts"):
        offload.Engine(model, optim.AdamW(lr=1e-3), budget, activations="offload", checkpoint_activations=False)
    with offload.Engine(model, optim.AdamW(lr=1e-3), budget, checkpoint_activations=False) as engine:
        assert engine.activations is ActivationMode.KEEP  # the older spelling


def test_mezo_recomputes_whatever_is_asked(tmp_path):
    """MeZO has no backward: nothing to offload for, so "offload" runs its layers as "recompute" does."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "model"))
    budget = offload.Budget(device="1GB", host="1GB", nvme=tmp_path / "swap")
    with offload.Engine(model, optim.MeZO(lr=1e-6), budget, activations="offload") as engine:
        assert engine.activations is ActivationMode.RECOMPUTE
        assert "activation_bytes_written" not in engine.stats()


MACHINE = offload.Machine(name="test", flops=1e11, disk_read=1e9, disk_write=1e9, optimizer_rate=1e9)


@pytest.mark.parametrize(("disk", "expected"), [(1e12, True), (1e3, False)])
def test_offload_pays_when_the_disk_keeps_up(disk, expected, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "model"))
    machine = dataclasses.replace(MACHINE, disk_read=disk, disk_write=disk)
    assert offload_pays(model, machine, torch.float32) is expected


def test_auto_follows_the_rates(tmp_path):
    path = save_tiny_model("llama", tmp_path / "model")
    fast = dataclasses.replace(MACHINE, disk_read=1e12, disk_write=1e12)
    # One micro-batch: with accumulation "auto" takes the vertical schedule first (test_vertical.py)
    with _engine(path, tmp_path, activations="auto", machine=fast, accumulation_steps=1) as engine:
        assert engine.activations is ActivationMode.OFFLOAD
    slow = dataclasses.replace(MACHINE, disk_read=1e3, disk_write=1e3)
    with _engine(path, tmp_path, activations="auto", machine=slow, accumulation_steps=1) as engine:
        assert engine.activations is ActivationMode.RECOMPUTE


def test_store_round_trips_layouts_and_writes_a_shared_tensor_once(tmp_path):
    """Transposed (kept strides), sliced (comes back contiguous), bool and bf16 tensors come back equal; a tensor
    saved twice through two views is written once (Note [Saved twice])."""
    with ThreadPoolBackend(tmp_path / "swap") as backend:
        store = activations.ActivationStore(backend, torch.device("cpu"), limit_bytes=8192)
        base = torch.randn(64, 48)
        tensors = [base.t(), base[:, 5:20], base > 0, base.to(torch.bfloat16)]
        group = store.begin([])
        packed = [store.pack(group, t) for t in tensors]
        again = store.pack(group, base.t())  # another view object, the same bytes
        assert again is packed[0]
        for tensor, entry in zip(tensors, packed):
            unpacked = store.unpack(entry)
            assert torch.equal(unpacked, tensor) and unpacked.dtype == tensor.dtype
        assert store.unpack(packed[0]).stride() == base.t().stride()
        store.release(group)
        assert store.held == 0
        assert store.bytes_read + store.bytes_unread == store.bytes_written
        assert store.bytes_written == sum(-(-t.numel() * t.element_size() // 4096) * 4096 for t in tensors)
        store.close()


def test_a_group_dropped_without_backward_is_let_go(tmp_path):
    """A layer call whose graph never runs backward (a forward under no_grad drops its ctx) frees its buffers."""
    with ThreadPoolBackend(tmp_path / "swap") as backend:
        store = activations.ActivationStore(backend, torch.device("cpu"), limit_bytes=1 << 20)
        group = store.begin([])
        store.pack(group, torch.randn(256, 256))
        del group
        store.close()  # waits for the write, whose callback frees the buffer of an entry let go of
        assert store.held == 0 and store.bytes_written > 0


def test_freed_buffers_are_reused_unless_a_view_holds_them(tmp_path, monkeypatch):
    """A host copy whose write is done, or a read-back buffer autograd let go of, serves the next entry of its size
    (no fresh memory to page-fault); one a tensor still views is never handed out again."""
    made = []
    fresh = activations.aligned_empty
    monkeypatch.setattr(activations, "aligned_empty", lambda nbytes, **kw: made.append(nbytes) or fresh(nbytes, **kw))
    with ThreadPoolBackend(tmp_path / "swap") as backend:
        store = activations.ActivationStore(backend, torch.device("cpu"), limit_bytes=1 << 20)
        first, second, third = (torch.randn(128, 128) for _ in range(3))
        group = store.begin([])
        entry = store.pack(group, first)
        store.wait_for_writes()  # the copy is on disk: its buffer is kept
        held = store.unpack(entry)  # read back into that buffer
        assert len(made) == 1 and torch.equal(held, first)
        store.release(group)  # `held` still views the buffer: it is not kept
        group = store.begin([])
        entry = store.pack(group, second)
        store.wait_for_writes()
        assert len(made) == 2, "a buffer a live tensor views was handed out again"
        assert torch.equal(store.unpack(entry), second)  # the unpacked tensor is dropped at once
        store.release(group)
        group = store.begin([])
        entry = store.pack(group, third)
        store.wait_for_writes()
        assert len(made) == 2, "a buffer nobody holds was not reused"
        assert torch.equal(store.unpack(entry), third) and torch.equal(held, first)
        store.release(group)
        store.close()


def test_steady_state_offload_makes_no_new_buffers(tmp_path, monkeypatch):
    """After its first step the store's buffers come from those freed before, not from fresh memory."""
    made = []
    fresh = activations.aligned_empty
    monkeypatch.setattr(activations, "aligned_empty", lambda nbytes, **kw: made.append(nbytes) or fresh(nbytes, **kw))
    path = save_tiny_model("llama", tmp_path / "model", seed=3, num_hidden_layers=3)
    batches = _batches(vocab_size=128, seed=5, steps=4)
    with _engine(path, tmp_path, activations="offload", accumulation_steps=1) as engine:
        engine.train_step(batches[0])
        first_step = len(made)
        for batch in batches[1:]:
            engine.train_step(batch)
        assert engine.stats()["activation_bytes_written"] > 0
    # Without reuse every save and every read would make one: 2 x first_step per step at least.
    assert first_step > 0 and len(made) - first_step < first_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it there)")
def test_cuda_activations_through_pinned_host_and_nvme(tmp_path):
    """On CUDA: saved tensors go device -> pinned host on the copy stream, past the 16 KiB limit to NVMe, and back
    to the device for backward; fp32 (TF32 off) against plain PyTorch on the same GPU."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        path = save_tiny_model("llama", tmp_path / "model", seed=3, num_hidden_layers=3)
        batches = _batches(vocab_size=128, seed=5, steps=2)
        model = AutoModelForCausalLM.from_pretrained(path)
        adamw = optim.AdamW(lr=1e-2, weight_decay=0.1)
        budget = offload.Budget(device="1GB", host="1GB", nvme=tmp_path / "swap")
        kept = offload.Engine(model, adamw, budget, activations="keep", device="cuda", compute_dtype=torch.float32)
        expected = [kept.train_step(batch) for batch in batches]
        kept.close()
        model = AutoModelForCausalLM.from_pretrained(path)
        with offload.Engine(model, optim.AdamW(lr=1e-2, weight_decay=0.1), budget, activations="offload",
                            activation_memory=16 * 1024, device="cuda", compute_dtype=torch.float32) as engine:
            losses = [engine.train_step(batch) for batch in batches]
            stats = engine.stats()
        torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
        assert stats["activation_bytes_written"] > 0
        assert stats["activation_bytes_read"] + stats["activation_bytes_unread"] == stats["activation_bytes_written"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
