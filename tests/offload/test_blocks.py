"""Block discovery must be right for every layout, or the engine streams the
wrong weights: these tests pin ownership, ordering, tying and hook points."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from finetune.offload import BlockPlan, find_blocks
from tests.tiny_models import ARCHITECTURES, random_batch, tiny_config

LAYERS_NAME = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}

CASES = [
    pytest.param(arch, tied, id=f"{arch}-{'tied' if tied else 'untied'}")
    for arch in ARCHITECTURES
    for tied in (False, True)
]


def build(arch: str, tied: bool, device: str = "cpu") -> PreTrainedModel:
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_config(arch, tie_word_embeddings=tied))


def module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def hook_blocks(plan: BlockPlan, name: str) -> tuple[int, ...]:
    return next(point.blocks for point in plan.hook_points if point.name == name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_model_trains(arch: str) -> None:
    model = build(arch, tied=tiny_config(arch).tie_word_embeddings)
    loss = model(**random_batch(model.config.vocab_size)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(param.grad is not None for param in model.parameters())


def test_tiny_model_defaults_cover_tied_and_untied() -> None:
    tied = {arch: tiny_config(arch).tie_word_embeddings for arch in ARCHITECTURES}
    assert tied["gpt2"] and tied["opt"] and tied["qwen2"]
    assert not (tied["llama"] or tied["gpt_neox"] or tied["phi3"])


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_tying_matches_config(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embed.weight) == tied


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_one_block_per_layer(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    layers = [block for block in plan.blocks if block.is_layer]
    assert plan.layers_name == LAYERS_NAME[arch]
    assert len(layers) == model.config.num_hidden_layers
    assert [block.name for block in layers] == [f"layers.{i}" for i in range(len(layers))]
    for i, block in enumerate(layers):
        assert all(name.startswith(f"{plan.layers_name}.{i}.") for name in block.params)


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_every_parameter_owned_exactly_once(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    owned = [(name, param) for block in plan.blocks for name, param in block.params.items()]
    assert len({id(param) for _, param in owned}) == len(owned)
    assert {id(param) for _, param in owned} == {id(param) for param in model.parameters()}
    assert sorted(name for name, _ in owned) == sorted(dict(model.named_parameters()))
    assert sum(block.numel for block in plan.blocks) == sum(p.numel() for p in model.parameters())
    for name, _ in owned:
        assert plan.block_of(name) == next(b.index for b in plan.blocks if name in b.params)


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_block_params_follow_named_parameters_order(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    owned_in_order = [name for block in plan.blocks for name in block.params]
    assert owned_in_order == [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_tied_head_is_alias_owned_by_embed_block(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    head_name = module_name(model, model.get_output_embeddings())
    embed_name = module_name(model, model.get_input_embeddings())
    if tied:
        assert plan.aliases == {f"{head_name}.weight": f"{embed_name}.weight"}
        assert plan.block_of(f"{head_name}.weight") == 0
        assert plan.blocks[0].name == "embed"
    else:
        assert plan.aliases == {}
        assert plan.block_of(f"{head_name}.weight") == plan.blocks[-1].index
    assert plan.block_of(f"{embed_name}.weight") == 0


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_head_hook_point_needs_the_owner_of_its_weight(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    head_blocks = hook_blocks(plan, module_name(model, model.get_output_embeddings()))
    assert head_blocks == ((0,) if tied else (plan.blocks[-1].index,))


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_blocks_ordered_embed_layers_tail(arch: str, tied: bool) -> None:
    plan = find_blocks(build(arch, tied))
    assert [block.index for block in plan.blocks] == list(range(len(plan.blocks)))
    kinds = ["layer" if block.is_layer else block.name for block in plan.blocks]
    assert kinds[0] == "embed"
    assert kinds[1 : 1 + kinds.count("layer")] == ["layer"] * kinds.count("layer")
    # Tied OPT has nothing left for a tail: its final norm is registered
    # before the layers and its head weight belongs to the embed block.
    assert kinds[1 + kinds.count("layer") :] == ([] if (arch, tied) == ("opt", True) else ["tail"])


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_layers_are_hooked_whole(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    layer_blocks = [block for block in plan.blocks if block.is_layer]
    prefix = f"{plan.layers_name}."
    inside = [point for point in plan.hook_points if point.name.startswith(prefix)]
    assert [point.name for point in inside] == [f"{prefix}{i}" for i in range(len(layer_blocks))]
    assert [point.blocks for point in inside] == [(block.index,) for block in layer_blocks]
    layers = model.get_submodule(plan.layers_name)
    assert [point.module for point in inside] == list(layers)


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_outer_hook_points_are_modules_owning_parameters(arch: str, tied: bool) -> None:
    model = build(arch, tied)
    plan = find_blocks(model)
    outer = [p.name for p in plan.hook_points if not p.name.startswith(f"{plan.layers_name}.")]
    expected = [
        name
        for name, module in model.named_modules()
        if list(module.parameters(recurse=False)) and not name.startswith(f"{plan.layers_name}.")
    ]
    assert outer == expected
    order = [name for name, _ in model.named_modules()]
    hooked = [point.name for point in plan.hook_points]
    assert hooked == sorted(hooked, key=order.index)


def test_opt_final_norm_registered_before_layers_belongs_to_embed() -> None:
    """OPT registers final_layer_norm before its layers; ownership follows
    registration order, and the hook point tells the engine what it needs."""
    plan = find_blocks(build("opt", tied=False))
    assert plan.block_of("model.decoder.final_layer_norm.weight") == 0
    assert hook_blocks(plan, "model.decoder.final_layer_norm") == (0,)
    assert plan.blocks[-1].name == "tail"
    assert list(plan.blocks[-1].params) == ["lm_head.weight"]


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_meta_model_gives_the_same_plan(arch: str, tied: bool) -> None:
    real, meta = find_blocks(build(arch, tied)), find_blocks(build(arch, tied, device="meta"))

    def summary(plan: BlockPlan) -> object:
        blocks = [(b.index, b.name, list(b.params), b.is_layer, b.numel) for b in plan.blocks]
        hooks = [(p.name, p.blocks) for p in plan.hook_points]
        return blocks, hooks, plan.layers_name, plan.aliases

    assert all(p.is_meta for b in meta.blocks for p in b.params.values())
    assert summary(meta) == summary(real)


def test_frozen_parameters_are_still_owned() -> None:
    model = build("llama", tied=False)
    model.get_input_embeddings().requires_grad_(False)
    plan = find_blocks(model)
    embed = model.get_input_embeddings()
    assert plan.blocks[0].params["model.embed_tokens.weight"] is embed.weight


def test_block_of_unknown_name_raises() -> None:
    plan = find_blocks(build("gpt2", tied=True))
    with pytest.raises(KeyError, match="no.such"):
        plan.block_of("no.such.weight")


class Layer(nn.Module):
    """A layer with its own small stack of identical modules (like MoE experts)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(2))
        self.mlp = nn.Linear(width, 8 * width)


class Wrapper(nn.Module):
    """A small stack registered first, then the big one, each layer nesting a stack."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.layers = nn.ModuleList(Layer(width) for _ in range(3))
        self.head = nn.Linear(width, width)


def test_largest_module_list_is_the_layers() -> None:
    model = Wrapper()
    plan = find_blocks(model)
    assert plan.layers_name == "layers"
    names = [block.name for block in plan.blocks]
    assert names == ["embed", "layers.0", "layers.1", "layers.2", "tail"]
    adapters = [f"adapters.{i}.{kind}" for i in range(2) for kind in ("weight", "bias")]
    assert list(plan.blocks[0].params) == adapters
    assert "layers.1.experts.0.weight" in plan.blocks[2].params
    assert [point.name for point in plan.hook_points] == [
        "adapters.0", "adapters.1", "layers.0", "layers.1", "layers.2", "head"
    ]


def test_layer_reusing_another_layers_weight_needs_both_blocks() -> None:
    model = Wrapper()
    model.layers[2].mlp.weight = model.layers[0].mlp.weight
    plan = find_blocks(model)
    assert plan.aliases == {"layers.2.mlp.weight": "layers.0.mlp.weight"}
    assert hook_blocks(plan, "layers.2") == (1, 3)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), id="sequential"),
        pytest.param(nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)]), id="mixed-classes"),
        pytest.param(nn.ModuleList([nn.Linear(4, 4)]), id="single-layer"),
        pytest.param(
            nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.ReLU(), nn.ReLU()])), id="no-params"
        ),
    ],
)
def test_model_without_repeated_layers_is_rejected(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=f"^{type(model).__name__} has no nn.ModuleList"):
        find_blocks(model)
