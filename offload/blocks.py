"""Cut a causal LM into the blocks that are streamed between memory tiers.

A model larger than device memory is trained one block at a time, so the
engine needs to know which parameters travel together and which blocks a
module needs resident when it runs. Everything here is read from the module
tree alone (names, registration order, parameter identity and shapes), so it
works unchanged on models built on the meta device and on any architecture
whose decoder layers live in an ``nn.ModuleList``.

Registration order, not execution order, decides which outer block a module
belongs to: OPT registers ``final_layer_norm`` before its layers, so its
parameters land in the embed block. Hook points record that dependency, so the
engine still fetches the right block when the module runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

EMBED = "embed"
TAIL = "tail"


@dataclass
class Block:
    """Parameters that move between tiers as one unit."""

    index: int
    name: str
    params: dict[str, nn.Parameter]
    is_layer: bool

    @property
    def numel(self) -> int:
        """Size of the block; uses shapes only, so it is valid on meta tensors."""
        return _numel(self.params.values())


@dataclass
class HookPoint:
    """A module whose forward must not run until ``blocks`` are resident."""

    module: nn.Module
    name: str
    blocks: tuple[int, ...]


@dataclass
class BlockPlan:
    """How a model is streamed: its blocks and where to hook to fetch them."""

    blocks: list[Block]
    hook_points: list[HookPoint]
    layers_name: str
    aliases: dict[str, str]

    def block_of(self, param_name: str) -> int:
        """Owning block of a parameter; tied aliases resolve to their owner
        so a state-dict key under either name lands in the same block."""
        owner_name = self.aliases.get(param_name, param_name)
        for block in self.blocks:
            if owner_name in block.params:
                return block.index
        raise KeyError(f"{param_name!r} is not a parameter of this model")

    def outer_sides(self) -> tuple[list[int], list[int]]:
        """The blocks the modules before the layers need, and those the modules after them need (a tied head
        needs the embedding's block), each once, in the order of the hook points."""
        layer_points = [k for k, point in enumerate(self.hook_points) if self.blocks[point.blocks[0]].is_layer]

        def blocks_of(points: list[HookPoint]) -> list[int]:
            return list(dict.fromkeys(index for point in points for index in point.blocks))

        return blocks_of(self.hook_points[: layer_points[0]]), blocks_of(self.hook_points[layer_points[-1] + 1 :])


def find_blocks(model: nn.Module) -> BlockPlan:
    """Split ``model`` into an embed block, one block per repeated layer and a
    tail block, each parameter owned exactly once."""
    layers_name, layers = _find_layers(model)
    blocks = _make_blocks(model, layers_name, len(layers))
    return BlockPlan(
        blocks=blocks,
        hook_points=_find_hook_points(model, layers_name, blocks),
        layers_name=layers_name,
        aliases=_find_aliases(model),
    )


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers are the bulk of any LM, so the heaviest stack of
    identical modules is them; smaller stacks (e.g. experts inside a layer)
    are part of a layer. Ties go to the earliest registered stack."""
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and _is_repeated_stack(module)
    ]
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of >= 2 same-class "
            "children holding parameters, so it has no repeated layers to stream"
        )
    return max(stacks, key=lambda stack: _numel(stack[1].parameters()))


def _is_repeated_stack(modules: nn.ModuleList) -> bool:
    """Only a list of same-class modules with weights can be streamed layer by layer."""
    return (
        len(modules) >= 2
        and len({type(module) for module in modules}) == 1
        and _numel(modules.parameters()) > 0
    )


def _make_blocks(model: nn.Module, layers_name: str, num_layers: int) -> list[Block]:
    """Group parameters by the region of the module tree that registers them.

    ``named_parameters`` yields each tied parameter once, under the first name
    in registration order, so the first block it appears in owns it.
    """
    embed: dict[str, nn.Parameter] = {}
    layers: list[dict[str, nn.Parameter]] = [{} for _ in range(num_layers)]
    tail: dict[str, nn.Parameter] = {}
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for param_name, param in model.named_parameters():
        module_name = param_name.rpartition(".")[0]
        layer = _layer_index(module_name, layers_name)
        if layer is not None:
            layers[layer][param_name] = param
        elif position[module_name] > position[layers_name]:
            tail[param_name] = param
        else:
            embed[param_name] = param

    groups = [(EMBED, embed, False)] if embed else []
    groups += [(f"layers.{i}", params, True) for i, params in enumerate(layers)]
    groups += [(TAIL, tail, False)] if tail else []
    return [
        Block(index=index, name=name, params=params, is_layer=is_layer)
        for index, (name, params, is_layer) in enumerate(groups)
    ]


def _find_hook_points(
    model: nn.Module, layers_name: str, blocks: list[Block]
) -> list[HookPoint]:
    """A layer is hooked as a whole because its block is fetched as a whole;
    outside the layers, every module that owns weights is hooked, and needs
    whichever blocks own those weights (a tied head needs the embed block)."""
    owner = {id(param): block.index for block in blocks for param in block.params.values()}
    layer_blocks = {
        f"{layers_name}.{i}": block.index
        for i, block in enumerate(block for block in blocks if block.is_layer)
    }

    def needed(params: Iterable[nn.Parameter]) -> set[int]:
        return {owner[id(param)] for param in params}

    hook_points: list[HookPoint] = []
    for name, module in model.named_modules():
        if name in layer_blocks:
            indices = {layer_blocks[name]} | needed(module.parameters())
        elif _layer_index(name, layers_name) is None:
            indices = needed(module.parameters(recurse=False))
        else:
            continue
        if indices:
            hook_points.append(HookPoint(module, name, tuple(sorted(indices))))
    return hook_points


def _find_aliases(model: nn.Module) -> dict[str, str]:
    """Map every extra name of a tied parameter to the name that owns it, so
    checkpoints saved under either name can be routed to the owner."""
    owner_name = {id(param): name for name, param in model.named_parameters()}
    return {
        name: owner_name[id(param)]
        for name, param in model.named_parameters(remove_duplicate=False)
        if name != owner_name[id(param)]
    }


def _layer_index(module_name: str, layers_name: str) -> int | None:
    """Index of the layer containing ``module_name``, or None outside the layers."""
    prefix = f"{layers_name}."
    if not module_name.startswith(prefix):
        return None
    return int(module_name[len(prefix) :].split(".", 1)[0])


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(param.numel() for param in params)
