"""The streaming engine: train a causal LM whose training state is larger than memory.

One training step, for each micro-batch:

    forward:  for each block i: hold i (waits for its prefetch) -> run -> release i; prefetch i+1 .. i+k
    backward: for each layer i, last first: hold i with its gradient chunk -> recompute (checkpointing) ->
              backward -> release; on the last micro-batch its optimizer update starts on a worker thread,
              overlapped with the backward of layer i-1 (Fuyou)

The embedding and head blocks run under ordinary autograd: they are held again, just before their backward,
by a hook on their output's gradient. With exact clipping every update waits for the whole-model gradient
norm, so the updates run after backward instead of inside it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..optim.base import ChunkOptimizer, StateSpec
from ..optim.layout import ChunkLayout, chunk_nbytes
from ..optim.mezo import MeZO
from .blocks import Block, BlockPlan, find_blocks
from .budget import Budget, detect_hardware, format_bytes
from .checkpoint import ADAPTER_WEIGHTS, ENGINE_STATE_FILE, FORMAT_VERSION, OPTIMIZER_PREFIX, atomic_directory
from .checkpointing import StreamedCheckpoint, StreamedLayer
from .chunks import Chunk, Tier
from .device import default_compute_dtype, make_transport
from .export import write_safetensors_shards
from .frozen import SafetensorsSource, tensor_ranges
from .meta_model import meta_model
from .nvme import open_backend
from .quantized import QUANTIZATIONS, QuantizedLayout, quantizable_weights
from .store import ChunkStore
from .weights import load_block_weights, safetensors_index
from .zeroth_order import ZerothOrderPass

__all__ = ["ClipMode", "Engine"]


class ClipMode(str, enum.Enum):
    """How `max_grad_norm` is applied.

    EXACT: the norm of the whole model's gradient, as torch.nn.utils.clip_grad_norm_; every update waits for the
    end of backward (gradient chunks are kept, on NVMe if need be, and read again for the update).
    PER_BLOCK: each block's gradient is clipped to its share of `max_grad_norm` (max_grad_norm * sqrt(block
    numel / model numel)) as soon as the block's backward ends, so updates overlap backward. If every block
    sits at its threshold the global norm is exactly max_grad_norm; a spike in one block is clipped there.
    """

    EXACT = "exact"
    PER_BLOCK = "per-block"


@dataclass
class _Streamed:
    """One block's chunks and the parameters that view into them."""

    block: Block
    layout: ChunkLayout
    params: list[nn.Parameter]
    weights: Chunk
    master: Chunk | None
    grads: Chunk | None  # None for zeroth-order training
    states: dict[str, Chunk]
    aliases: list[tuple[nn.Parameter, int]] = field(default_factory=list)  # tied twins, with the slot they view
    holds: int = 0
    grad_holds: int = 0
    norms: list[torch.Tensor] | None = None
    # Parameters with requires_grad=False (a peft model's base): one read-only weights chunk, nothing else.
    frozen_layout: ChunkLayout | None = None
    frozen_params: list[nn.Parameter] = field(default_factory=list)
    frozen_aliases: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    frozen: Chunk | None = None
    # QLoRA: the frozen chunk holds NF4 codes in this layout; `dequantized` is their compute form while held.
    quantized: QuantizedLayout | None = None
    dequantized: torch.Tensor | None = None

    @property
    def trainable(self) -> bool:
        """Whether the block has parameters to train (else its trainable chunks are empty and never used)."""
        return bool(self.layout.slots)

    def bound(self) -> list[tuple[nn.Parameter, int]]:
        """Every Parameter object that views this block's chunks, with the index of the slot it views."""
        return [(p, i) for i, p in enumerate(self.params)] + self.aliases

    def frozen_bound(self) -> list[tuple[nn.Parameter, int]]:
        """Every Parameter object that views the frozen chunk, with the index of the slot it views."""
        return [(p, i) for i, p in enumerate(self.frozen_params)] + self.frozen_aliases


class Engine:
    """Trains `model` with `optimizer`, keeping at most `budget` bytes in each memory tier.

    Args:
        model: a Hugging Face causal LM (its decoder layers must support gradient checkpointing). Its
            parameters are moved into the engine's chunks; the module keeps only empty placeholders.
        optimizer: a chunk-wise optimizer from `optim`, or `optim.MeZO` (zeroth-order: no backward, no
            gradients; needs fp32 compute, no accumulation and no clipping).
        budget: bytes per tier and the NVMe swap directory.
        prefetch: how many blocks ahead to start loading.
        accumulation_steps: micro-batches per optimizer step; `train_step` splits its batch into this many.
        max_grad_norm: clip gradients to this norm (None: no clipping).
        clip_mode: see `ClipMode`.
        checkpoint_activations: recompute each layer in backward and keep only its input (activation memory of
            one layer). False keeps every layer's activations until its backward, as plain PyTorch does: no
            recompute (about a third less compute), but activation memory grows with batch x sequence x layers,
            and it is not counted in the budget.
        device: where to compute; default CUDA when available, else CPU.
        compute_dtype: dtype of weights in compute; default bfloat16 on CUDA, float32 on CPU (bf16 matrix
            products are far slower than fp32 on most CPUs). Master weights and optimizer math are fp32.
        weights: a Hugging Face model directory to read the weights from, for a model built on the meta device.
            Frozen parameters (requires_grad=False, e.g. a peft model's base) are then read straight from its
            safetensors files whenever their block is loaded, and never written to the swap directory.
        quantize_frozen: "nf4" stores the frozen nn.Linear weights of the decoder layers as 4-bit NF4 (QLoRA,
            with bitsandbytes, as transformers' `BitsAndBytesConfig(load_in_4bit=True)` quantizes them): a
            quarter of the bytes to hold and move. They are quantized once, when the engine is built, and
            dequantized each time their layer computes.
        keep_swap: keep the swap files when the engine closes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: ChunkOptimizer | MeZO,
        budget: Budget | None = None,
        *,
        prefetch: int = 2,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_mode: ClipMode | str = ClipMode.EXACT,
        checkpoint_activations: bool = True,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
        weights: str | Path | None = None,
        quantize_frozen: str | None = None,
        keep_swap: bool = False,
    ) -> None:
        errors = []
        if quantize_frozen is not None:
            if quantize_frozen not in QUANTIZATIONS:
                errors.append(f"quantize_frozen={quantize_frozen!r} is not one of {QUANTIZATIONS}")
            if all(p.requires_grad for p in model.parameters()):
                errors.append(
                    "quantize_frozen quantizes frozen weights, and this model has none; freeze the base (e.g. "
                    "peft.get_peft_model) or drop quantize_frozen"
                )
        if prefetch < 0:
            errors.append(f"prefetch={prefetch} must be >= 0")
        if accumulation_steps < 1:
            errors.append(f"accumulation_steps={accumulation_steps} must be >= 1")
        if max_grad_norm is not None and max_grad_norm <= 0:
            errors.append(f"max_grad_norm={max_grad_norm} must be > 0, or None for no clipping")
        if isinstance(optimizer, MeZO):
            if accumulation_steps != 1 or max_grad_norm is not None:
                errors.append("MeZO takes no accumulation_steps or max_grad_norm (it has no gradients); drop them")
            if (compute_dtype or torch.float32) != torch.float32:
                errors.append("MeZO needs compute_dtype=torch.float32: it perturbs and updates the weights themselves")
            if any(not p.requires_grad for p in model.parameters()):
                errors.append("MeZO with frozen parameters (requires_grad=False) is not supported yet; train them all")
        if errors:
            raise ValueError("Engine: " + "; ".join(errors))
        self.model, self.optimizer = model, optimizer
        self.budget = budget or Budget()
        self.prefetch_depth, self.accumulation_steps = prefetch, accumulation_steps
        self.max_grad_norm, self.clip_mode = max_grad_norm, ClipMode(clip_mode)
        self.checkpoint_activations = checkpoint_activations
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device, zeroth_order=isinstance(optimizer, MeZO))
        self.quantize_frozen = quantize_frozen
        self.step_count = 0
        self.plan: BlockPlan = find_blocks(model)
        self._blocks = self._layouts()
        device_bytes, host_bytes = self.budget.resolved(self.device)
        self._check_budget(device_bytes, host_bytes)
        backend = open_backend(self.budget.nvme, keep_files=keep_swap) if self.budget.nvme else None
        # A held layer's dequantized weights are a temporary outside the chunks: their room is kept aside.
        dequantized = max((s.frozen_layout.nbytes(self.compute_dtype) for s in self._blocks if s.quantized), default=0)
        self.store = ChunkStore(device_bytes - dequantized, host_bytes, make_transport(self.device), backend)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="frozen-read")  # loads of frozen chunks
        self._weights_dir = Path(weights) if weights is not None else None
        self._create_chunks(weights)
        self._load_weights(weights)
        model.to(self.device)  # buffers only: every parameter is an empty placeholder by now
        # Block and slot of every Parameter object over a chunk (tied twins included), for the zeroth-order pass.
        self._first_layer = min(index for index, s in enumerate(self._blocks) if s.block.is_layer)
        self._slot_of = {id(p): (index, slot) for index, s in enumerate(self._blocks) for p, slot in s.bound()}
        self._zeroth = ZerothOrderPass(self, optimizer) if isinstance(optimizer, MeZO) else None
        self._install_hooks()
        self._updater = ThreadPoolExecutor(1, thread_name_prefix="optimizer")
        self._updates: list[Future] = []
        self._outer_held: list[int] = []
        self._last_micro = True
        self._training = False
        self._lock = threading.Lock()
        # Storage address of a held weight chunk -> (block index, "weights" or "frozen").
        self._held_storage: dict[int, tuple[int, str]] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, optimizer: ChunkOptimizer | MeZO, budget: Budget | None = None, **options: Any
    ) -> Engine:
        """Build the model on the meta device and stream its weights from `path`'s safetensors, block by block,
        so a model larger than RAM never has to be whole in memory."""
        from transformers import AutoConfig

        return cls(meta_model(AutoConfig.from_pretrained(path)), optimizer, budget, weights=path, **options)

    # ------------------------------------------------------------------------------------ construction

    def _layouts(self) -> list[_Streamed]:
        layouts = _block_layouts(self.model, self.plan)
        quantized = _quantized_layouts(self.model, layouts, self.quantize_frozen, self.compute_dtype)
        return [
            _Streamed(
                block, layout, [block.params[slot.name] for slot in layout.slots], None, None, None, {},  # type: ignore[arg-type]
                frozen_layout=frozen,
                frozen_params=[block.params[slot.name] for slot in frozen.slots] if frozen else [],
                quantized=quantized.get(block.name),
            )
            for block, layout, frozen in layouts
        ]

    @staticmethod
    def minimum_budget(
        model: nn.Module,
        optimizer: ChunkOptimizer | MeZO,
        *,
        compute_dtype: torch.dtype = torch.float32,
        quantize_frozen: str | None = None,
    ) -> tuple[int, int]:
        """(device bytes, host bytes) below which `Engine(model, optimizer, ...)` refuses to start."""
        need_device, need_host, _, _ = _model_minimums(model, optimizer, compute_dtype, quantize_frozen)
        return need_device, need_host

    @staticmethod
    def state_bytes(
        model: nn.Module,
        optimizer: ChunkOptimizer | MeZO,
        *,
        compute_dtype: torch.dtype = torch.float32,
        quantize_frozen: str | None = None,
    ) -> int:
        """Bytes of the whole training state (weights, gradients, masters, optimizer state, padded as chunks):
        what must fit in the budgets plus the NVMe directory."""
        return _model_minimums(model, optimizer, compute_dtype, quantize_frozen)[3]

    def _check_budget(self, device_bytes: int, host_bytes: int) -> None:
        """Refuse now, with the numbers, rather than fail mid-step."""
        layouts = [(s.block, s.layout, s.frozen_layout) for s in self._blocks]
        quantized = {s.block.name: s.quantized for s in self._blocks if s.quantized}
        need_device, need_host, largest, total = _minimums(layouts, self.optimizer, self.compute_dtype, quantized)
        problems = []
        if device_bytes < need_device:
            problems.append(
                f"Budget.device={format_bytes(device_bytes)} is below the minimum {format_bytes(need_device)} "
                f"(the largest layer, {largest}, with its gradients, plus the embedding and head "
                f"blocks held through backward); raise it to at least {format_bytes(need_device)}"
            )
        if host_bytes < need_host:
            problems.append(
                f"Budget.host={format_bytes(host_bytes)} is below the minimum {format_bytes(need_host)} "
                f"(one block's weights, gradients and optimizer state at once); raise it to at least "
                f"{format_bytes(need_host)}"
            )
        if self.budget.nvme is None and device_bytes + host_bytes < total:
            problems.append(
                f"the training state needs {format_bytes(total)} but Budget.device + Budget.host is "
                f"{format_bytes(device_bytes + host_bytes)} and no NVMe directory was given; set Budget.nvme "
                f"to a directory on a fast disk, or raise the budgets"
            )
        if self.budget.nvme is not None and device_bytes + host_bytes < total:
            free = detect_hardware().disk_free(self.budget.nvme)
            if free < total:
                problems.append(
                    f"Budget.nvme={self.budget.nvme} has {format_bytes(free)} free but the swap files can grow to "
                    f"{format_bytes(total)} (every chunk of the training state may be evicted); free space there "
                    "or choose a directory on a disk with more room"
                )
        if problems:
            raise ValueError("; ".join(problems))

    def _create_chunks(self, directory: str | Path | None) -> None:
        # With a frozen base, what trains is adapters: small beside the base blocks streaming past, so kept.
        adapters = any(s.frozen_layout is not None for s in self._blocks)
        for s in self._blocks:
            chunks = {
                role: self.store.create(
                    f"{s.block.name}/{role}", spec.numel, spec.dtype, chunk_nbytes(spec.numel, spec.dtype), keep=adapters
                )
                for role, spec in _chunk_specs(s.layout, self.compute_dtype, self.optimizer).items()
            }
            s.weights, s.grads, s.master = chunks.pop("weights"), chunks.pop("grads", None), chunks.pop("master", None)
            s.states = chunks
            if s.frozen_layout is None:
                continue
            if s.quantized is not None:  # quantized in `_copy_weights_in`, then swapped like a trained chunk
                s.frozen = self.store.create(f"{s.block.name}/frozen", s.quantized.nbytes, torch.uint8, s.quantized.nbytes)
                continue
            source = None  # without a model directory, the module's values are copied in (and may be swapped out once)
            if directory is not None:
                ranges = tensor_ranges([slot.name for slot in s.frozen_layout.slots], self.plan.aliases, Path(directory))
                source = SafetensorsSource(s.frozen_layout, ranges, self.compute_dtype, self.store.backend, self._reader)
            s.frozen = self.store.create(
                f"{s.block.name}/frozen",
                s.frozen_layout.numel,
                self.compute_dtype,
                s.frozen_layout.nbytes(self.compute_dtype),
                source=source,
            )

    def _load_weights(self, directory: str | Path | None) -> None:
        """Copy each block's weights into its chunks, then leave the module only empty placeholders."""
        self._copy_weights_in(directory)
        # A tied weight's other use (the head) gets a Parameter object of its own over the same chunk, so each
        # use adds its gradient into the chunk as soon as it is computed. One shared object makes autograd keep
        # the head's vocab x hidden gradient until the embedding's arrives at the end of backward and sum the
        # two in a third tensor: memory outside the budget. With gradient accumulation the shared object stays:
        # PyTorch adds the two uses' sum into the accumulated gradient, and only that order is equal to
        # in-memory training to the bit.
        untie = self.accumulation_steps == 1
        for s in self._blocks:
            parts = [(s.layout, s.params, s.aliases, True)]
            if s.frozen_layout is not None:
                parts.append((s.frozen_layout, s.frozen_params, s.frozen_aliases, False))
            for layout, params, twins, trainable in parts:
                for i, slot in enumerate(layout.slots):
                    name, p = slot.name, s.block.params[slot.name]
                    aliases = [alias for alias, owner in self.plan.aliases.items() if owner == name]
                    if p.is_meta:  # a meta tensor cannot take CPU data in place: give the module a real Parameter
                        p = nn.Parameter(self._placeholder(), requires_grad=trainable)
                        for target in [name] + ([] if untie else aliases):
                            self._set_parameter(target, p)
                        s.block.params[name] = params[i] = p
                    p.data = self._placeholder()
                    p.requires_grad_(trainable)
                    for alias in aliases if untie else []:
                        twin = nn.Parameter(self._placeholder(), requires_grad=trainable)
                        self._set_parameter(alias, twin)
                        twins.append((twin, i))

    def _set_parameter(self, name: str, parameter: nn.Parameter) -> None:
        module_name, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(module_name), leaf, parameter)

    def _copy_weights_in(self, directory: str | Path | None, *, adapter: bool = False) -> None:
        """Weights (and fp32 masters) of every block from `directory`'s safetensors, or from the module.
        `adapter`: `directory` is a peft adapter directory; only the trainable (adapter) weights are copied."""
        for s in self._blocks:
            parts = [(s.layout, [c for c in (s.weights, s.master) if c is not None])] if s.trainable else []
            if not adapter and s.frozen is not None and s.frozen.source is None:  # a source reads it itself
                parts.append((s.frozen_layout, [s.frozen]))
            for layout, chunks in parts:
                names = [slot.name for slot in layout.slots]
                sources = (
                    self._adapter_tensors(Path(directory), names)
                    if adapter
                    else load_block_weights(s.block, self.plan.aliases, directory, names)
                )
                for chunk in chunks:
                    with self._in_host(chunk, dirty=True) as flat:
                        if chunk is s.frozen and s.quantized is not None:
                            s.quantized.quantize_into(flat, sources)
                            continue
                        for view, source in zip(layout.views(flat), sources):
                            view.copy_(source)
                del sources

    def _placeholder(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.compute_dtype, device=self.device)

    def _install_hooks(self) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for point in self.plan.hook_points:
            blocks = point.blocks
            point.module.register_forward_pre_hook(partial(self._before_forward, blocks))
            point.module.register_forward_hook(partial(self._after_forward, blocks))
            if self._zeroth is not None:
                self._zeroth.install(point.module, blocks)
            if len(blocks) == 1 and self._blocks[blocks[0]].block.is_layer:
                if not isinstance(point.module, GradientCheckpointingLayer):
                    raise ValueError(
                        f"{type(point.module).__name__} ({point.name}) does not support gradient checkpointing, "
                        "which streaming needs; this architecture is not supported yet"
                    )
                point.module.gradient_checkpointing = True
                call = StreamedCheckpoint if self.checkpoint_activations else StreamedLayer
                point.module._gradient_checkpointing_func = partial(call.apply, self, blocks[0], self.device)

    # -------------------------------------------------------------------------------- holding blocks

    def _hold(self, index: int, *, grads: bool = False) -> None:
        s = self._blocks[index]
        for role, chunk, layout, bound in self._weight_parts(s):
            flat = self.store.acquire(chunk, Tier.DEVICE)
            if s.holds == 0:
                if role == "frozen" and s.quantized is not None:
                    s.dequantized = flat = self._dequantize(s, flat)
                views = layout.views(flat)
                for p, slot in bound:
                    p.data = views[slot]
                self._held_storage[flat.untyped_storage().data_ptr()] = (index, role)
        s.holds += 1
        if grads:
            flat = self.store.acquire(s.grads, Tier.DEVICE)
            if s.grad_holds == 0:
                views = s.layout.views(flat)
                for p, slot in s.bound():
                    p.grad = views[slot]  # autograd accumulates into the chunk in place
            s.grad_holds += 1

    def _release(self, index: int, *, grads: bool = False) -> None:
        s = self._blocks[index]
        if grads:
            s.grad_holds -= 1
            if s.grad_holds == 0:
                for p, _ in s.bound():
                    p.grad = None
            self.store.release(s.grads, Tier.DEVICE, dirty=True)
        s.holds -= 1
        for role, chunk, _, bound in self._weight_parts(s):
            if s.holds == 0:
                for p, _ in bound:
                    p.data = self._placeholder()
                del self._held_storage[self._compute_flat(s, role).untyped_storage().data_ptr()]
            self.store.release(chunk, Tier.DEVICE)  # never dirty: compute does not write the weights
        if s.holds == 0:
            s.dequantized = None

    def _dequantize(self, s: _Streamed, codes: torch.Tensor) -> torch.Tensor:
        """The frozen weights of a quantized block in the compute dtype, next to its held codes."""
        flat = torch.empty(s.frozen_layout.numel, dtype=self.compute_dtype, device=codes.device)
        s.quantized.dequantize_into(codes, flat)
        return flat

    @staticmethod
    def _compute_flat(s: _Streamed, role: str) -> torch.Tensor:
        """The held buffer the parameters of `role` view: the chunk's, or a quantized block's dequantized one."""
        if role == "frozen" and s.quantized is not None:
            return s.dequantized
        return getattr(s, role).typed(Tier.DEVICE)

    @staticmethod
    def _weight_parts(s: _Streamed) -> list[tuple[str, Chunk, ChunkLayout, list[tuple[nn.Parameter, int]]]]:
        """(role, chunk, layout, bound parameters) of the weight chunks a forward needs: trained, then frozen."""
        parts = [("weights", s.weights, s.layout, s.bound())]
        if s.frozen is not None:
            parts.append(("frozen", s.frozen, s.frozen_layout, s.frozen_bound()))
        return parts

    def saved_weights(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Autograd hooks under which a saved view of a held weight chunk is kept as (block, place) and re-made at
        backward from the block's buffer then, which may be another buffer (the block was evicted and loaded
        again, and its old buffer reused). Saving the view itself would pin memory outside the budget, or, once
        the buffer is reused, read another chunk's bytes."""

        def pack(tensor: torch.Tensor) -> Any:
            held = self._held_storage.get(tensor.untyped_storage().data_ptr())
            if held is None:
                return tensor
            index, role = held
            flat = self._compute_flat(self._blocks[index], role)
            if tensor.dtype != flat.dtype:
                return tensor
            return index, role, tensor.storage_offset() - flat.storage_offset(), tensor.shape, tensor.stride()

        def unpack(packed: Any) -> torch.Tensor:
            if torch.is_tensor(packed):
                return packed
            index, role, offset, shape, stride = packed
            chunk = getattr(self._blocks[index], role)
            if not chunk.pinned(Tier.DEVICE):
                raise RuntimeError(f"backward needs the weights of {chunk.key}, which are not held; this is a bug")
            flat = self._compute_flat(self._blocks[index], role)
            return flat.as_strided(shape, stride, flat.storage_offset() + offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _prefetch(self, indices: range) -> None:
        for index in indices:
            if 0 <= index < len(self._blocks):
                s = self._blocks[index]
                self.store.prefetch(s.weights, Tier.DEVICE)
                if s.frozen is not None:
                    self.store.prefetch(s.frozen, Tier.DEVICE)
                if self._training and not s.grads.zero:
                    self.store.prefetch(s.grads, Tier.DEVICE)

    def _before_forward(self, blocks: tuple[int, ...], module: nn.Module, args: Any) -> None:
        for index in blocks:
            self._hold(index)
        self._prefetch(range(blocks[-1] + 1, blocks[-1] + 1 + self.prefetch_depth))

    def _after_forward(self, blocks: tuple[int, ...], module: nn.Module, args: Any, output: Any) -> None:
        is_layer = len(blocks) == 1 and self._blocks[blocks[0]].block.is_layer
        if self._training and torch.is_grad_enabled() and not is_layer:
            tensor = next((t for t in _tensors(output) if t.requires_grad), None)
            if tensor is not None:
                tensor.register_hook(partial(self._before_outer_backward, blocks))
            elif blocks[0] < self._first_layer:
                # A frozen embedding's output needs no gradient, but the layers' streamed calls only run their
                # backward (and so train the adapters inside them) for an input that requires one.
                for t in _tensors(output):
                    if t.is_floating_point() and t.is_leaf:
                        t.requires_grad_(True)
        for index in blocks:
            self._release(index)

    def _before_outer_backward(self, blocks: tuple[int, ...], grad: torch.Tensor) -> None:
        """Runs when the gradient of an outer module's output is ready, just before that module's backward."""
        for index in blocks:
            self._hold(index, grads=self._blocks[index].trainable)
            self._outer_held.append(index)

    # ------------------------------------------------------------------- called by StreamedCheckpoint

    def begin_layer_backward(self, index: int) -> None:
        self._hold(index, grads=self._blocks[index].trainable)
        self._prefetch(range(index - 1, index - 1 - self.prefetch_depth, -1))
        if self._last_micro:
            # This layer's optimizer state, for its update; with the first layer, also the embedding's and head's,
            # whose updates come last, right after backward, with nothing left to hide their loads behind.
            upcoming = [index]
            if index == self._first_layer:
                upcoming += [i for i, s in enumerate(self._blocks) if not s.block.is_layer]
            for chunk in [chunk for i in upcoming for chunk in self._blocks[i].states.values()]:
                self.store.prefetch(chunk, Tier.HOST)

    def end_layer_backward(self, index: int) -> None:
        trainable = self._blocks[index].trainable
        if self._last_micro and trainable:
            self._finish_block(index)
        self._release(index, grads=trainable)
        if self._last_micro and trainable and self._updates_in_backward():
            self._submit_update(index)

    # ----------------------------------------------------------------------------------- the step

    def train_step(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> float:
        """One optimizer step over `batch` (split into `accumulation_steps` micro-batches); returns the mean loss."""
        micro_batches = self._split(batch)
        if self._zeroth is not None:
            if len(micro_batches) != 1:
                raise ValueError(f"MeZO takes one batch per step, got {len(micro_batches)} micro-batches; join them")
            return self._zeroth.step(micro_batches[0])
        self.model.train()
        self._training = True
        self.step_count += 1
        losses = []
        try:
            for k, micro in enumerate(micro_batches):
                self._last_micro = k == len(micro_batches) - 1
                with self.saved_weights():
                    loss = self.model(**micro, use_cache=False).loss
                (loss / len(micro_batches)).backward()
                self._end_backward()
                losses.append(loss.detach())
            if not self._updates_in_backward():
                coefficient = self._global_clip_coefficient()
                for index in range(len(self._blocks)):
                    if self._blocks[index].trainable:
                        self._submit_update(index, coefficient)
            self._wait_for_updates()
        finally:
            self._training = False
        self._prefetch(range(self.prefetch_depth))
        return float(torch.stack(losses).mean())  # host sync: the loss value

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Loss of the current weights on `batch`, without gradients or updates."""
        self._settle()
        self.model.eval()
        loss = self.model(**self._to_device(batch), use_cache=False).loss
        return float(loss)  # host sync: the loss value

    def _split(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        if isinstance(batch, list):
            return [self._to_device(micro) for micro in batch]
        size = len(next(iter(batch.values())))
        if size % self.accumulation_steps:
            raise ValueError(
                f"batch size {size} is not divisible by accumulation_steps={self.accumulation_steps}; "
                "use a batch size that is a multiple of it"
            )
        parts = [dict(zip(batch, values)) for values in zip(*(v.chunk(self.accumulation_steps) for v in batch.values()))]
        return [self._to_device(micro) for micro in parts]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _end_backward(self) -> None:
        """Release the embedding and head blocks held through backward; their updates start now."""
        held, self._outer_held = self._outer_held, []
        finished = []
        for index in held:
            trainable = self._blocks[index].trainable
            if self._last_micro and trainable and index not in finished:
                self._finish_block(index)
                finished.append(index)
            self._release(index, grads=trainable)
        if self._last_micro and self._updates_in_backward():
            for index in finished:
                self._submit_update(index)

    def _updates_in_backward(self) -> bool:
        return self.max_grad_norm is None or self.clip_mode is ClipMode.PER_BLOCK

    def _finish_block(self, index: int) -> None:
        """The block's gradient is final: keep the per-tensor norms clipping needs (cheap, data is hot)."""
        s = self._blocks[index]
        if self.max_grad_norm is not None:
            s.norms = [torch.linalg.vector_norm(p.grad, 2) for p in s.params]

    def _global_clip_coefficient(self) -> torch.Tensor | None:
        if self.max_grad_norm is None:
            return None
        norms = [norm for s in self._blocks for norm in s.norms or []]  # model.parameters() order, as torch stacks them
        total = torch.linalg.vector_norm(torch.stack(norms), 2)
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _block_clip_coefficient(self, s: _Streamed) -> torch.Tensor | None:
        if self.max_grad_norm is None or self.clip_mode is ClipMode.EXACT:
            return None
        # Layout sizes, not Block.numel: parameters of blocks not resident have empty placeholders.
        total_numel = sum(slot.numel for b in self._blocks for slot in b.layout.slots)
        block_numel = sum(slot.numel for slot in s.layout.slots)
        threshold = self.max_grad_norm * (block_numel / total_numel) ** 0.5
        norm = torch.linalg.vector_norm(torch.stack(s.norms), 2)
        return torch.clamp(threshold / (norm + 1e-6), max=1.0)

    def _submit_update(self, index: int, coefficient: torch.Tensor | None = None) -> None:
        # The worker owns the block's chunks from here; train_step waits for every update before returning, so
        # the next forward never sees half-updated weights.
        self._updates.append(self._updater.submit(self._update, index, coefficient, self.step_count))

    def _update(self, index: int, coefficient: torch.Tensor | None, step: int) -> None:
        """Optimizer step of one block, on the worker thread, in host memory."""
        s = self._blocks[index]
        if coefficient is None:
            coefficient = self._block_clip_coefficient(s)
        weights = self.store.acquire(s.weights, Tier.HOST)
        master = self.store.acquire(s.master, Tier.HOST) if s.master is not None else weights
        grads = self.store.acquire(s.grads, Tier.HOST)
        states = {name: self.store.acquire(chunk, Tier.HOST) for name, chunk in s.states.items()}
        grads = grads if grads.dtype == torch.float32 else grads.float()
        if coefficient is not None:
            grads.mul_(coefficient)
        self.optimizer.step(master, grads, states, step=step, layout=s.layout)
        if s.master is not None:
            weights.copy_(master)
            self.store.release(s.master, Tier.HOST, dirty=True)
        self.store.release(s.weights, Tier.HOST, dirty=True)
        for chunk in s.states.values():
            self.store.release(chunk, Tier.HOST, dirty=True)
        self.store.release(s.grads, Tier.HOST)
        self.store.discard(s.grads)  # used up: the next step starts from zeros without reading anything
        s.norms = None

    def _wait_for_updates(self) -> None:
        updates, self._updates = self._updates, []
        for future in updates:
            future.result()

    def _settle(self) -> None:
        """Every update so far applied to the weights: before they are read outside a step."""
        self._wait_for_updates()
        if self._zeroth is not None:
            self._zeroth.flush()

    # ---------------------------------------------------------------------------------------- output

    def export(self, path: str | Path, dtype: torch.dtype | None = None, *, max_shard_size: int = 2 << 30) -> Path:
        """Write a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads.

        Weights stream from the chunks one block at a time (fp32 masters where they exist), cast to `dtype`
        (default: the dtype of the master weights, float32).
        """
        self._settle()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = dtype or torch.float32
        buffers = {
            name: buffer
            for name, buffer in self.model.state_dict(keep_vars=True).items()
            if not isinstance(buffer, nn.Parameter) and name not in self.plan.aliases
        }
        specs = [(slot.name, slot.shape, dtype) for s in self._blocks for layout, _ in self._export_parts(s) for slot in layout.slots]
        specs += [(name, buffer.shape, buffer.dtype) for name, buffer in buffers.items()]
        write_safetensors_shards(path, specs, self._export_stream(dtype, buffers), max_shard_bytes=max_shard_size)
        self.model.config.save_pretrained(path)
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(path)
        return path

    def _export_stream(self, dtype: torch.dtype, buffers: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for s in self._blocks:
            for layout, chunk in self._export_parts(s):
                with self._in_host(chunk) as flat:
                    if chunk is s.frozen and s.quantized is not None:  # the weights the model computes with
                        flat = self._dequantize(s, flat)
                    for slot in layout.slots:
                        yield slot.name, slot.view(flat).to(dtype)
        yield from buffers.items()

    @staticmethod
    def _export_parts(s: _Streamed) -> list[tuple[ChunkLayout, Chunk]]:
        parts = [(s.layout, s.master or s.weights)]
        if s.frozen is not None:
            parts.append((s.frozen_layout, s.frozen))
        return parts

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained adapter of a peft-wrapped model as `PeftModel.save_pretrained` does
        (adapter_config.json + adapter_model.safetensors, fp32), from the chunks, so that
        `PeftModel.from_pretrained(base, path)` loads it.

        Raises:
            ValueError: the model is not a peft model.
        """
        config = getattr(self.model, "peft_config", None)
        if not config:
            raise ValueError("save_adapter needs a peft model (peft.get_peft_model(model, config)); use export for a whole model")
        self._settle()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for s in self._blocks:
            if not s.trainable:
                continue
            with self._in_host(s.master or s.weights) as flat:
                for slot in s.layout.slots:
                    tensors[self._adapter_key(slot.name)] = slot.view(flat).to(torch.float32).clone()
        save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config[self.model.active_adapter].save_pretrained(path)
        return path

    def _adapter_key(self, name: str) -> str:
        """peft's saved keys drop the adapter name: ...lora_A.default.weight -> ...lora_A.weight"""
        return name.replace(f".{self.model.active_adapter}.", ".")

    def _adapter_tensors(self, directory: Path, names: list[str]) -> list[torch.Tensor]:
        with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as file:
            return [file.get_tensor(self._adapter_key(name)) for name in names]

    def _saves_adapter_only(self) -> bool:
        """A checkpoint of a peft model whose base is read from its files holds only the adapter: the base
        never changes and is read from the same files on resume."""
        return bool(getattr(self.model, "peft_config", None)) and self._weights_dir is not None

    @contextmanager
    def _in_host(self, chunk: Chunk, *, dirty: bool = False) -> Iterator[torch.Tensor]:
        """`chunk` held in host memory for the body of a with-statement (outside any training step)."""
        flat = self.store.acquire(chunk, Tier.HOST)
        try:
            yield flat
        finally:
            self.store.release(chunk, Tier.HOST, dirty=dirty)

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write everything a resumed run needs into the new directory `directory`, atomically.

        The directory is a Hugging Face model directory of the fp32 master weights (so it can be exported or
        loaded as a model), or, for a peft model whose base is read from its files (`weights=`), the peft
        adapter directory of `save_adapter` (the base is not copied), plus the optimizer's state chunks and the
        step count, plus `extra` (whatever
        `torch.load(weights_only=True)` reads back: RNG states, data position, schedule). Nothing is visible
        under `directory` until all of it is on disk; the previous checkpoints are never touched.

        Raises:
            FileExistsError: `directory` exists.
        """
        self._settle()
        states = [(f"{s.block.name}/{name}", chunk) for s in self._blocks for name, chunk in s.states.items()]
        with atomic_directory(Path(directory)) as temporary:
            if self._saves_adapter_only():
                self.save_adapter(temporary)
            else:
                self.export(temporary)
            write_safetensors_shards(
                temporary,
                [(key, torch.Size([chunk.numel]), chunk.dtype) for key, chunk in states],
                self._state_stream(states),
                max_shard_bytes=2 << 30,
                prefix=OPTIMIZER_PREFIX,
            )
            engine_state = {
                "format": FORMAT_VERSION,
                "step": self.step_count,
                "optimizer": type(self.optimizer).__name__,
                "adapter_only": self._saves_adapter_only(),
                "optimizer_state": self.optimizer.state_dict(),
                "chunks": self._fingerprint(),
                "extra": extra or {},
            }
            torch.save(engine_state, temporary / ENGINE_STATE_FILE)
            try:  # refuse now what load_checkpoint could not read back
                torch.load(temporary / ENGINE_STATE_FILE, weights_only=True)
            except Exception as error:
                raise ValueError(
                    f"save_checkpoint: extra holds something torch.load(weights_only=True) cannot read ({str(error).splitlines()[0]}); "
                    "keep to dicts, lists, numbers, strings and tensors"
                ) from None
        return Path(directory)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer state and step count from `save_checkpoint`'s directory; returns `extra`.

        Raises:
            ValueError: the directory is not a checkpoint, or belongs to another model or optimizer.
        """
        directory = Path(directory)
        if not (directory / ENGINE_STATE_FILE).is_file():
            raise ValueError(f"{directory} is not a checkpoint (no {ENGINE_STATE_FILE}); pass a directory written by save_checkpoint")
        engine_state = torch.load(directory / ENGINE_STATE_FILE, weights_only=True)
        optimizer = type(self.optimizer).__name__
        if engine_state["optimizer"] != optimizer:
            raise ValueError(
                f"checkpoint {directory} was trained with {engine_state['optimizer']}, not {optimizer}; "
                f"resume with the same optimizer"
            )
        if engine_state["chunks"] != self._fingerprint():
            raise ValueError(
                f"checkpoint {directory} belongs to a different model (its tensors or state shapes differ); "
                "resume with the model and optimizer settings it was trained with"
            )
        self._wait_for_updates()
        if self._zeroth is not None:
            self._zeroth.pending = None  # the loaded weights replace what it would have updated
        self._copy_weights_in(directory, adapter=engine_state.get("adapter_only", False))
        index = safetensors_index(directory, OPTIMIZER_PREFIX)
        for s in self._blocks:
            for name, chunk in s.states.items():
                key = f"{s.block.name}/{name}"
                with safe_open(index[key], framework="pt") as file:
                    saved = file.get_tensor(key)
                with self._in_host(chunk, dirty=True) as flat:
                    flat.copy_(saved)
        self.optimizer.load_state_dict(engine_state["optimizer_state"])
        self.step_count = engine_state["step"]
        return engine_state["extra"]

    def _state_stream(self, states: list[tuple[str, Chunk]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, chunk in states:
            with self._in_host(chunk) as flat:
                yield key, flat

    def _fingerprint(self) -> list[tuple]:
        """What must match between a checkpoint and this engine: every tensor's name and shape, every chunk's
        size and dtype."""
        tensors = [(slot.name, tuple(slot.shape)) for s in self._blocks for slot in s.layout.slots]
        tensors += [(slot.name, tuple(slot.shape)) for s in self._blocks if s.frozen_layout for slot in s.frozen_layout.slots]
        chunks = [
            (f"{s.block.name}/{name}", chunk.numel, str(chunk.dtype)) for s in self._blocks for name, chunk in s.states.items()
        ]
        return tensors + chunks + [("quantize_frozen", str(self.quantize_frozen))]

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of chunks in memory now, per tier ("device", "host"), for progress displays."""
        return self.store.resident_bytes()

    def stats(self) -> dict[str, int]:
        """Bytes moved and peak bytes per tier so far."""
        return {
            "bytes_read": self.store.bytes_read,
            "bytes_written": self.store.bytes_written,
            "peak_device": self.store.peak[Tier.DEVICE],
            "peak_host": self.store.peak[Tier.HOST],
        }

    def close(self) -> None:
        """Wait for pending work and remove the swap files (unless keep_swap)."""
        self._wait_for_updates()
        self._updater.shutdown(wait=True)
        self.store.close()
        self._reader.shutdown(wait=True)
        if self.store.backend is not None:
            self.store.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _block_layouts(model: nn.Module, plan: BlockPlan) -> list[tuple[Block, ChunkLayout, ChunkLayout | None]]:
    """Each block's element layout of trainable parameters, with embedding weights (and heads tied to them)
    marked, and of its frozen parameters (None if it has none)."""
    embeddings = frozenset(
        plan.aliases.get(f"{name}.weight", f"{name}.weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    )
    layouts = []
    for block in plan.blocks:
        trainable = {n: p.shape for n, p in block.params.items() if p.requires_grad}
        frozen = {n: p.shape for n, p in block.params.items() if not p.requires_grad}
        layouts.append(
            (block, ChunkLayout.from_shapes(trainable, embeddings), ChunkLayout.from_shapes(frozen) if frozen else None)
        )
    return layouts


def _quantized_layouts(
    model: nn.Module,
    layouts: list[tuple[Block, ChunkLayout, ChunkLayout | None]],
    quantize_frozen: str | None,
    compute_dtype: torch.dtype,
) -> dict[str, QuantizedLayout]:
    """Block name -> the NF4 layout of its frozen chunk, for the decoder layers with frozen nn.Linear weights
    (the embedding and head stay in the compute dtype, as in transformers' 4-bit loading)."""
    if quantize_frozen is None:
        return {}
    quantized = {}
    for block, _, frozen in layouts:
        names = quantizable_weights(model, [slot.name for slot in frozen.slots]) if frozen and block.is_layer else None
        if names:
            quantized[block.name] = QuantizedLayout(frozen, names, compute_dtype)
    return quantized


def _model_minimums(
    model: nn.Module, optimizer: ChunkOptimizer | MeZO, compute_dtype: torch.dtype, quantize_frozen: str | None
) -> tuple[int, int, str, int]:
    layouts = _block_layouts(model, find_blocks(model))
    quantized = _quantized_layouts(model, layouts, quantize_frozen, compute_dtype)
    return _minimums(layouts, optimizer, compute_dtype, quantized)


def _chunk_specs(
    layout: ChunkLayout, compute_dtype: torch.dtype, optimizer: ChunkOptimizer | MeZO
) -> dict[str, StateSpec]:
    """The chunks one block has: compute weights, gradients, fp32 masters if compute is not fp32, states.
    Zeroth-order training has only the weights."""
    if isinstance(optimizer, MeZO):
        return {"weights": StateSpec(layout.numel, compute_dtype)}
    specs = {"weights": StateSpec(layout.numel, compute_dtype), "grads": StateSpec(layout.numel, compute_dtype)}
    if compute_dtype != torch.float32:
        specs["master"] = StateSpec(layout.numel, torch.float32)
    states = optimizer.state_specs(layout)
    clash = sorted(set(states) & set(specs))
    if clash:
        raise ValueError(f"{type(optimizer).__name__}.state_specs uses reserved chunk names {clash}; rename them")
    specs.update(states)
    return specs


def _minimums(
    layouts: list[tuple[Block, ChunkLayout, ChunkLayout | None]],
    optimizer: ChunkOptimizer | MeZO,
    compute_dtype: torch.dtype,
    quantized: dict[str, QuantizedLayout],
) -> tuple[int, int, str, int]:
    """(device minimum, host minimum, largest layer's name, total state bytes) for a model's blocks.

    Device: the embedding and head blocks are held from their backward hook to the end of backward, while one
    layer computes with its gradients (MeZO: held through the forward, no gradients; its perturbed copies of one
    module's weights are temporaries, like activations). Host: one block's whole update (weights, gradients,
    states) at once, or its frozen weights chunk (staged through host memory on CUDA). Frozen parameters have
    only that chunk: no gradients, masters or states. A quantized block computes with its NF4 chunk and, while
    held, the dequantized weights.
    """
    roles = 1 if isinstance(optimizer, MeZO) else 2  # weights, and gradients unless zeroth-order
    frozen = {
        b.name: quantized[b.name].nbytes if b.name in quantized else frozen.nbytes(compute_dtype) if frozen else 0
        for b, _, frozen in layouts
    }
    dequantized = {b.name: frozen.nbytes(compute_dtype) if b.name in quantized else 0 for b, _, frozen in layouts}
    compute = {
        b.name: roles * layout.nbytes(compute_dtype) + frozen[b.name] + dequantized[b.name] for b, layout, _ in layouts
    }
    update = {
        b.name: sum(chunk_nbytes(spec.numel, spec.dtype) for spec in _chunk_specs(layout, compute_dtype, optimizer).values())
        for b, layout, _ in layouts
    }
    outer = sum(compute[b.name] for b, _, _ in layouts if not b.is_layer)
    largest = max((b.name for b, _, _ in layouts if b.is_layer), key=compute.__getitem__)
    host = max(max(update.values()), max(frozen.values()))
    return outer + compute[largest], host, largest, sum(update.values()) + sum(frozen.values())


def _tensors(output: Any) -> list[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []
