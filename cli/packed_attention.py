"""Packed sequences without cross-talk: each example in a packed sequence attends only to itself.

A packed batch carries `position_ids` that restart at 0 where each example starts (and are 0 at every padding
position, which makes each padding token a one-token example of its own), and no 2-D `attention_mask`. That is
transformers' own packed format (its DataCollatorWithFlattening), and transformers 5 reads it in the models whose
mask functions receive `position_ids`: `create_causal_mask` turns the restarts into a block-diagonal causal mask
for the eager, sdpa and flex implementations, and the flash-attention ones run varlen kernels over the examples.
The batch stays O(batch x length), and the engine passes it to the model's forward as it is (offload's
`micro_batches` cuts every tensor of a batch along its first dimension alike).

A model whose mask functions do not receive `position_ids` (OPT, in transformers 5.24) would attend across the
examples. For it, the batch also carries the block-diagonal causal mask itself: 4-D, additive (0 where a query may
attend a key, the dtype's minimum elsewhere) in the compute dtype, which eager and sdpa both take as it is
(`create_causal_mask` returns a 4-D mask unchanged). It costs batch x length^2 elements.

The loss side is the sequences' (cli/sequences.py, Note [Packed boundaries]): the first token of each example is
not a target. Both together make a packed batch's per-example losses those of the examples run one by one
(tests/cli/test_packed_attention.py).
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import torch
from torch import nn

__all__ = ["block_causal_mask", "honours_packed_positions", "packed_positions"]

_MASK_FUNCTIONS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask",
                   "create_masks_for_generate")
"""transformers' mask builders: given `position_ids` and no 2-D mask, each finds packed sequences in them."""


def packed_positions(starts: np.ndarray, length: int, padded: int) -> torch.Tensor:
    """The position ids (padded,) of a sequence of `length` tokens whose examples begin at `starts` (the first
    is 0), right-padded to `padded` with zeros."""
    starts = starts.astype(np.int64)
    positions = np.zeros(padded, np.int64)
    positions[:length] = np.arange(length) - np.repeat(starts, np.diff(np.append(starts, length)))
    return torch.from_numpy(positions)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask (batch, 1, length, length) that lets each query attend to the keys of its own example
    up to itself: 0 there, the dtype's minimum elsewhere. An example starts where its position is 0."""
    example = (position_ids == 0).cumsum(-1)  # (batch, length): which example each token is in
    same = example[:, :, None] == example[:, None, :]
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool).tril()
    mask = torch.zeros(same.shape, dtype=dtype).masked_fill_(~(same & causal), torch.finfo(dtype).min)
    return mask[:, None]


def honours_packed_positions(model: nn.Module) -> bool:
    """Whether the model's attention masks are built from `position_ids`, so that position restarts separate
    packed examples: every call of a transformers mask function in the model's transformers modules passes them
    (by keyword, or in the dict it unpacks), also where the function is first assigned to a name
    (`mask_function = create_causal_mask if ... else ...`). Read from the source, because the meta model cannot
    run. A model with code of its own (--trust-remote-code), or one that calls none of them, gets the explicit
    mask (`block_causal_mask`): a wrong "no" costs memory, a wrong "yes" would let examples attend to each other."""
    calls: list[bool] = []
    for module in {inspect.getmodule(type(m)) for m in model.modules()}:
        name = module.__name__ if module is not None else ""
        if name.startswith(("torch.", "peft.", "bitsandbytes.", "finetune.")) or \
                (name.startswith("transformers.") and not name.startswith("transformers.models.")):
            continue  # layers, activations, adapters: no attention masks are made there
        if not name.startswith("transformers.models."):
            return False  # the model's own code
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError, SyntaxError):
            return False
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            names = set(_MASK_FUNCTIONS) | _aliases(function)
            calls += [_passes_positions(call, function) for call in ast.walk(function)
                      if isinstance(call, ast.Call) and _name(call.func) in names]
    return bool(calls) and all(calls)


def _aliases(function: ast.AST) -> set[str]:
    """Names that `function` assigns a mask function to."""
    return {target.id for node in ast.walk(function) if isinstance(node, ast.Assign)
            and any(_name(n) in _MASK_FUNCTIONS for n in ast.walk(node.value) if isinstance(n, ast.expr))
            for target in node.targets if isinstance(target, ast.Name)}


def _passes_positions(call: ast.Call, function: ast.AST) -> bool:
    if any(keyword.arg == "position_ids" for keyword in call.keywords):
        return True
    unpacked = any(keyword.arg is None for keyword in call.keywords)  # mask_function(**mask_kwargs)
    return unpacked and any(isinstance(node, ast.Dict) and any(isinstance(key, ast.Constant) and
                                                                key.value == "position_ids" for key in node.keys)
                            for node in ast.walk(function))


def _name(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
