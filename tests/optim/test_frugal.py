"""FRUGAL against its specification: density 0 is signSGD, density 1 without reset is torch.optim.AdamW, and
0 < density < 1 matches a written-out float64 reference of the split; streamed equals in memory, and resumes exactly.
"""

from __future__ import annotations

import pytest
import torch
from streamed import batches, flatten, max_difference, train_in_memory, train_streamed, zero_state
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.optim.frugal import column_subset, tensor_plans
from finetune.optim.layout import ChunkLayout, chunk_nbytes
from finetune.optim.projection import HEADS

LR, WEIGHT_DECAY, BETAS, EPS = 1e-2, 0.1, (0.9, 0.99), 1e-8
SHAPES = {
    "layers.0.attn.weight": torch.Size([24, 40]),  # wide: svd projects on the left
    "layers.0.mlp.weight": torch.Size([48, 16]),  # tall: svd projects on the right
    "layers.0.norm.weight": torch.Size([24]),  # full AdamW
    "lm_head.weight": torch.Size([30, 16]),  # full AdamW
    "embed.weight": torch.Size([30, 16]),  # an embedding: full AdamW
}
MATRICES = ("layers.0.attn.weight", "layers.0.mlp.weight")
LAYOUT = ChunkLayout.from_shapes(SHAPES, frozenset({"embed.weight"}))


def _run(ours: optim.Frugal, steps: int, seed: int = 0):
    """Our optimizer on one flat chunk; returns (initial tensors, the gradients of each step, final chunk, state)."""
    generator = torch.Generator().manual_seed(seed)
    initial = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    grads = [{name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()} for _ in range(steps)]
    params, state = flatten(initial, LAYOUT), zero_state(ours, LAYOUT)
    projectors = []
    for step, g in enumerate(grads, start=1):
        ours.step(params, flatten(g, LAYOUT), state, step=step, layout=LAYOUT)
        projectors.append(state["projector"].clone() if "projector" in state else None)
    return initial, grads, params, projectors


def _torch_adamw(initial: dict, grads: list[dict], names) -> dict[str, torch.Tensor]:
    named = {name: torch.nn.Parameter(initial[name].clone()) for name in names}
    adamw = torch.optim.AdamW(named.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    for g in grads:
        for name, p in named.items():
            p.grad = g[name]
        adamw.step()
    return {name: p.detach() for name, p in named.items()}


def _frugal(**options) -> optim.Frugal:
    return optim.Frugal(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **options)


@pytest.mark.parametrize("subspace", ["columns", "svd"])
def test_density_zero_is_sign_sgd(subspace):
    initial, grads, params, _ = _run(_frugal(density=0.0, subspace=subspace, update_gap=2), steps=5)
    full = _torch_adamw(initial, grads, [n for n in SHAPES if n not in MATRICES])
    for name in MATRICES:
        expected = initial[name].clone()
        for g in grads:
            expected.mul_(1 - LR * WEIGHT_DECAY).add_(g[name].sign(), alpha=-LR)
        assert torch.equal(LAYOUT.slots[list(SHAPES).index(name)].view(params), expected), name
    for slot in LAYOUT.slots:
        if slot.name not in MATRICES:
            assert torch.equal(slot.view(params), full[slot.name]), slot.name


def test_density_one_without_reset_is_torch_adamw():
    """Every column in the subspace, re-drawn every 2 steps in another order, moments kept: AdamW, bit for bit."""
    initial, grads, params, _ = _run(_frugal(density=1.0, update_gap=2, reset_statistics=False), steps=6)
    expected = _torch_adamw(initial, grads, SHAPES)
    for slot in LAYOUT.slots:
        assert torch.equal(slot.view(params), expected[slot.name]), slot.name


def _float64_reference(
    initial: dict,
    grads: list[dict],
    projectors: list,
    *,
    subspace: str,
    density: float,
    gap: int,
    reset: bool,
    rule: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The split written out in float64 for the projectable matrices; returns (weights, mask of elements whose
    inactive gradient was within 1e-6 of zero, where fp32 and fp64 may disagree on its sign)."""
    beta1, beta2 = BETAS
    weights, masks = {}, {}
    for name in MATRICES:
        w = initial[name].double()
        mask = torch.zeros_like(w, dtype=torch.bool)
        exp_avg = exp_avg_sq = None
        for step, g32 in enumerate(grads, start=1):
            g = g32[name].double()
            w = w * (1 - LR * WEIGHT_DECAY)
            start = step - (step - 1) % gap
            left, right = _subspace(name, g, projectors[start - 1], subspace, density, start, check=step == start)
            low = left @ g @ right  # the subspace part, in its own coordinates
            if exp_avg is None or (reset and step == start):
                exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
            t = step - start + 1 if reset else step
            exp_avg = beta1 * exp_avg + (1 - beta1) * low
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * low * low
            m_hat, v_hat = exp_avg / (1 - beta1**t), exp_avg_sq / (1 - beta2**t)
            w = w + left.t() @ (-LR * m_hat / (v_hat.sqrt() + EPS)) @ right.t()
            rest = g - left.t() @ low @ right.t()
            mask |= (rest != 0) & (rest.abs() < 1e-6)
            w = w - LR * (rest.sign() if rule == "sign_sgd" else rest)
        weights[name], masks[name] = w, mask
    return weights, masks


def _subspace(
    name: str, g: torch.Tensor, projectors: torch.Tensor | None, subspace: str, density: float, start: int, check: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with the subspace part of G = L^T (L G R) R^T, in float64.

    columns: L = I, R selects the period's columns. svd: our projector P of the period, checked (at the period's
    first step) to span the top singular vectors of that step's float64 gradient; right side L = I, R = P^T; left
    side L = P^T, R = I.
    """
    rows, columns = g.shape
    if subspace == "columns":
        picked = column_subset(columns, int(columns * density), seed=0, period_start=start, name=name)
        select = torch.zeros(columns, len(picked), dtype=torch.float64)
        select[picked, torch.arange(len(picked))] = 1.0
        return torch.eye(rows, dtype=torch.float64), select
    tensors, _, _ = tensor_plans(LAYOUT, "svd", density, HEADS)
    basis = next(t.projector for t in tensors if t.slot.name == name).view(projectors).double()
    ours = basis.t() if rows >= columns else basis  # orthonormal columns spanning the subspace
    if check:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        top = vh[: ours.shape[1]].t() if rows >= columns else u[:, : ours.shape[1]]
        assert torch.allclose(ours @ ours.t(), top @ top.t(), atol=1e-4), f"{name}: not the top singular subspace"
    if rows >= columns:
        return torch.eye(rows, dtype=torch.float64), ours
    return ours.t(), torch.eye(columns, dtype=torch.float64)


@pytest.mark.parametrize(
    "subspace, reset, rule",
    [("columns", True, "sign_sgd"), ("columns", False, "sgd"), ("svd", True, "sign_sgd"), ("svd", False, "sgd")],
)
def test_partial_density_matches_float64_reference(subspace, reset, rule):
    density, gap = 0.4, 2
    ours = _frugal(density=density, subspace=subspace, update_gap=gap, reset_statistics=reset, inactive_update=rule)
    initial, grads, params, projectors = _run(ours, steps=5, seed=3)
    expected, masks = _float64_reference(
        initial, grads, projectors, subspace=subspace, density=density, gap=gap, reset=reset, rule=rule
    )
    for name in MATRICES:
        got = LAYOUT.slots[list(SHAPES).index(name)].view(params).double()
        close = (got - expected[name]).abs() <= 1e-5
        assert (close | masks[name]).all(), f"{name}: max difference {(got - expected[name]).abs().max():.3g}"
        assert masks[name].float().mean() < 0.01, "near-zero inactive gradients must stay rare"


def test_column_subsets_are_seeded_by_period_and_name():
    a = column_subset(40, 16, seed=0, period_start=1, name="w")
    assert torch.equal(a, column_subset(40, 16, seed=0, period_start=1, name="w"))
    assert len(set(a.tolist())) == 16 and int(a.max()) < 40
    assert not torch.equal(a, column_subset(40, 16, seed=0, period_start=3, name="w"))
    assert not torch.equal(a, column_subset(40, 16, seed=0, period_start=1, name="v"))
    assert not torch.equal(a, column_subset(40, 16, seed=1, period_start=1, name="w"))


def test_state_bytes_per_parameter():
    """Columns at density 0.25: 2 bytes per parameter of a projectable matrix (8 * 0.25), nothing else."""
    layout = ChunkLayout.from_shapes({"mlp.down_proj.weight": torch.Size([4096, 11008])})
    for subspace in ("columns", "svd"):
        specs = optim.Frugal(density=0.25, subspace=subspace).state_specs(layout)
        per_param = sum(chunk_nbytes(s.numel, s.dtype) for s in specs.values()) / (4096 * 11008)
        print(f"\nFrugal {subspace} density 0.25 state bytes per parameter, 4096 x 11008: {per_param:.3f}")
        assert per_param <= 2.0 + 1e-3 if subspace == "columns" else per_param < 2.8


@pytest.mark.parametrize("subspace", ["columns", "svd"])
def test_streamed_through_nvme_equals_in_memory(subspace, tmp_path):
    """6 steps with T=2 through the engine (all state on NVMe) against the same optimizer through optim.InMemory."""
    path = save_tiny_model("qwen2", tmp_path / "model", seed=8, num_hidden_layers=3)
    data = batches(6, seed=25)
    options = {"density": 0.3, "subspace": subspace, "update_gap": 2, "seed": 5}
    engine = train_streamed(path, _frugal(**options), data, tmp_path / "swap", tmp_path / "out")
    assert engine.stats()["bytes_written"] > 0
    model, _ = train_in_memory(path, lambda model: optim.InMemory.for_model(model, _frugal(**options)), data)
    assert max_difference(tmp_path / "out", model) == 0.0


def test_engine_checkpoint_resumes_exactly(tmp_path):
    """svd keeps its projector in a state chunk: save after step 4 (mid-period, T=3), resume, run to step 7."""
    path = save_tiny_model("llama", tmp_path / "model", seed=9, num_hidden_layers=2)
    data = batches(7, seed=27)
    options = {"density": 0.3, "subspace": "svd", "update_gap": 3}

    def engine(**kept: object) -> offload.Engine:  # the run's swap directory, where its checkpoint lives
        model = AutoModelForCausalLM.from_pretrained(path)
        device, host = offload.Engine.minimum_budget(model, _frugal(**options))
        budget = offload.Budget(device=device, host=host, nvme=tmp_path / "swap")
        return offload.Engine(model, _frugal(**options), budget, run_name="run", **kept)

    with engine() as first:
        for batch in data[:4]:
            first.train_step(batch)
        first.save_checkpoint(tmp_path / "checkpoint")
    with engine(checkpoints=[tmp_path / "checkpoint"]) as resumed:
        resumed.load_checkpoint(tmp_path / "checkpoint")
        for batch in data[4:]:
            resumed.train_step(batch)
        resumed.export(tmp_path / "resumed")
    model, _ = train_in_memory(path, lambda model: optim.InMemory.for_model(model, _frugal(**options)), data)
    assert max_difference(tmp_path / "resumed", model) == 0.0
