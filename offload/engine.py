"""The streaming engine: train a causal LM whose training state is larger than memory.

This module is the facade: it checks the settings, builds the pieces and hands each call to the one that does the
work. The pieces, bottom up (docs/architecture.md has the map):

- block_layout.py, floors.py: what each block's chunks hold, and the least budget that fits them;
- block_state.py, binding.py: the chunks in the store, filled with the weights, the module's parameters over them;
- residency.py: holding blocks on the compute device while their modules run, prefetching the next ones;
- first_order.py (with recompute.py, clipping.py, updates.py) and zeroth_order.py: one training step;
- model_export.py, checkpoint.py: the model and the training state out, and back in.

Threads (what each owns; the notes named here are in those modules):
- the compute thread (the caller's): forward, backward, every hook, holds and releases (residency.py);
- "optimizer": block updates, Note [The worker owns a block's chunks] (updates.py);
- "chunk-stage": the store's prefetches, whose waits for room never block compute (store.py);
- "nvme-io" (or kvikio's): swap-file reads and writes, each published under the store's lock when done (store.py);
- "frozen-read": frozen chunks read from the model's safetensors (frozen.py);
- "activation-spill" (CUDA, activations="offload"): writes of offloaded activations, each after its copy's event
  (activations.py; on CPU they go straight to the NVMe threads);
- "micro-batch-j" (the vertical schedule's forward, one per micro-batch): each runs its micro-batch's forward, one
  at a time, taking turns with the compute thread waiting: Note [Micro-batch turns] (vertical.py).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optim.base import ChunkOptimizer
from ..optim.mezo import MeZO
from .activation_choice import resolve
from .activation_mode import ActivationMode, activation_mode
from .activations import ACTIVATION_MEMORY, ActivationStore, OffloadedLayer, OffloadRunner
from .binding import bind_parameters, copy_weights_in
from .block_layout import block_layouts, compute_copies_nbytes
from .block_state import BlockState, block_states
from .blocks import BlockPlan, find_blocks
from .budget import Budget
from .checkpoint import (
    SWAP_ENTRY,
    fingerprint,
    read_engine_state,
    restore_states,
    swap_references,
    verify_version,
    write_checkpoint,
    write_swap_checkpoint,
)
from .chunks import Chunk, Tier
from .clip_mode import ClipMode
from .clipping import Clipping, updates_in_backward
from .cost_model import Machine
from .device import default_compute_dtype, make_transport
from .first_order import FirstOrderStep, micro_batches, to_device
from .floors import check_budget, floors, model_floors
from .head_grad import outer_gradients_into_chunks
from .helper_threads import helper_pool
from .meta_device import meta_model
from .model_export import adapter_tensors, export_model, is_peft, save_adapter
from .nvme import open_backend
from .quantized import QUANTIZATIONS
from .recompute import LayerRunner, StreamedCheckpoint, StreamedLayer
from .residency import DEFAULT_PREFETCH, Residency
from .sizes import parse_size
from .store import ChunkStore
from .swap_area import AREA_PREFIX, SwapArea
from .timers import NO_TIMERS, Timers
from .updates import UpdateWorker, queue_depth
from .vertical import VerticalCheckpoint, VerticalStep, vertical_blocker
from .zeroth_order import ZerothOrderStep

__all__ = ["Engine"]

Batch = dict[str, torch.Tensor]


class Engine:
    """Trains `model` with `optimizer`, keeping at most `budget` bytes in each memory tier.

    Args:
        model: a Hugging Face causal LM (its decoder layers must support gradient checkpointing). Its
            parameters are moved into the engine's chunks; the module keeps only empty placeholders.
        optimizer: a chunk-wise optimizer from `optim`, or `optim.MeZO` (zeroth-order: no backward, no
            gradients; needs fp32 compute, no accumulation and no clipping; `MeZO(storage_dtype=torch.bfloat16)`
            stores its weights in bf16 and upcasts each held block's to fp32).
        budget: bytes per tier and the NVMe swap directory.
        prefetch: how many blocks ahead to start loading. The best depth depends on the model, the budget and the
            machine's rates: `offload.choose_settings` predicts it (as `finetune run` does without --prefetch).
        accumulation_steps: micro-batches per optimizer step; `train_step` splits its batch into this many.
        vertical: with accumulation, run each block for all micro-batches while it is resident (vertical.py), so
            its weights, gradients and optimizer state are read and written once per step, not once per
            micro-batch; the results are the same to the bit. None (default): wherever that holds (not with a tied
            embedding, active dropout, or activations other than "recompute"); True: insist (ValueError saying why
            not); False: one micro-batch after another. `engine.vertical` says which runs.
        max_grad_norm: clip gradients to this norm (None: no clipping). With exact clipping (and a swap directory)
            the updates run inside backward as if unclipped and are rolled back and redone when the norm says so;
            a step whose gradient norm is not finite is skipped, with a warning (`stats()["skipped_steps"]`).
        clip_mode: see `ClipMode`.
        activations: what each decoder layer keeps for its backward (activation_mode.py). "recompute": only its
            input, its forward run again in backward (activation memory of one layer). "keep": every layer's
            activations until its backward, as plain PyTorch does: no recompute (about a third less compute), but
            activation memory grows with batch x sequence x layers, outside the budget. "offload": as "keep", with
            each layer's saved tensors written to the swap directory (on CUDA through pinned host memory) as forward
            makes them and read back ahead of its backward, within `activation_memory` (needs `budget.nvme`).
            "auto": "offload" where moving the bytes costs less than recomputing, at `machine`'s rates, else
            "recompute"; with accumulation, "recompute" wherever the vertical schedule then applies. MeZO has no
            backward: "offload" and "auto" run it as "recompute". `engine.activations` says which mode runs ("auto"
            resolved).
        checkpoint_activations: the older spelling: True is activations="recompute", False "keep".
        activation_memory: host memory (bytes, or a size such as "256MB") that offloaded activations may hold at
            once: copies waiting for their writes and tensors read back ahead. A layer's backward takes its own
            tensors whatever this says.
        machine: the rates activations="auto" decides from (`offload.measure_machine`, `offload.hardware_profile`);
            None measures this machine's (cached).
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
        keep_swap: keep the swap files (and their directory) when the engine closes.
        run_name: names the engine's directory inside `budget.nvme` (`finetune-<run_name>`), so that a later
            process of the same run finds it and removes what a killed one left there (`swap_reclaimed` says how
            much); None makes a fresh one with a random name. Either way it is private (mode 0700) and locked
            to this engine: see swap_area.py.
        verify_swap: check every swap-file read against a checksum of the bytes written (XXH3, hashed on the I/O
            threads), and stop with `ChecksumMismatch` naming the file when they differ: for disks one does not
            trust. benchmarks/checkpoint_cost.py measures what it costs.
        checkpoints: the kept checkpoints of this run (by `run_name`) that an earlier process saved in swap: the
            swap versions they reference are kept when the directory is cleared, so `load_checkpoint` can resume
            from any of them. Others (portable, damaged, another run's) are ignored here.
        timers: receives the seconds of each phase of a step (see timers.py), for benchmarks.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: ChunkOptimizer | MeZO,
        budget: Budget | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        accumulation_steps: int = 1,
        vertical: bool | None = None,
        max_grad_norm: float | None = None,
        clip_mode: ClipMode | str = ClipMode.EXACT,
        activations: ActivationMode | str = ActivationMode.RECOMPUTE,
        checkpoint_activations: bool | None = None,
        activation_memory: int | str = ACTIVATION_MEMORY,
        machine: Machine | None = None,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
        weights: str | Path | None = None,
        quantize_frozen: str | None = None,
        keep_swap: bool = False,
        run_name: str | None = None,
        verify_swap: bool = False,
        checkpoints: Iterable[str | Path] = (),
        timers: Timers = NO_TIMERS,
    ) -> None:
        _check_settings(model, optimizer, prefetch, accumulation_steps, max_grad_norm, compute_dtype, quantize_frozen)
        self.model, self.optimizer = model, optimizer
        self.budget = budget or Budget()
        self.accumulation_steps = accumulation_steps
        self.activations = activation_mode(activations, checkpoint_activations, self.budget.nvme)
        self._activation_memory = parse_size(activation_memory)
        self._saved: ActivationStore | None = None  # offloaded activations, once the steps are built
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        zeroth_order = isinstance(optimizer, MeZO)
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device, zeroth_order=zeroth_order)
        self.quantize_frozen = quantize_frozen
        self.step_count = 0
        self.plan: BlockPlan = find_blocks(model)
        self._weights_dir = Path(weights) if weights is not None else None
        layouts = block_layouts(model, self.plan, quantize_frozen, self.compute_dtype)
        device_bytes, host_bytes = self.budget.resolved(self.device)
        # Exact clipping speculates where it has swap files to keep the bytes it may roll back to (clipping.py).
        self._speculative = (max_grad_norm is not None and ClipMode(clip_mode) is ClipMode.EXACT
                             and self.budget.nvme is not None)
        self._grads_consumed = accumulation_steps == 1 and (
            self._speculative or updates_in_backward(max_grad_norm, ClipMode(clip_mode)))
        need = floors(layouts, self.plan, optimizer, self.compute_dtype, accumulation_steps)
        check_budget(need, device_bytes, host_bytes, self.budget.nvme, frozen_in_files=self._weights_dir is not None,
                     grads_in_swap=not self._grads_consumed, speculative=self._speculative)
        self._warned_skip = False  # a skipped step (gradient norm not finite) is warned about once
        self._spare_bytes = device_bytes + host_bytes - need.device - need.host  # updates.queue_depth
        self._keep_swap = keep_swap
        held = _held_versions(checkpoints, self.budget.nvme, run_name)
        keep = frozenset(name for names in held.values() for name in names)
        self.swap_area = SwapArea.open(self.budget.nvme, run_name, keep=keep) if self.budget.nvme else None
        backend = open_backend(self.swap_area.path, keep_files=keep_swap) if self.swap_area else None
        # Held compute copies (QLoRA's dequantized weights, bf16 MeZO weights in fp32): their room is kept aside.
        copies = compute_copies_nbytes(layouts, self.plan, optimizer, self.compute_dtype)
        self.store = ChunkStore(device_bytes - copies, host_bytes, make_transport(self.device), backend,
                                verify_reads=verify_swap)
        self._held: dict[Path, list[str]] = {}  # checkpoint in swap -> the versions it references
        for directory, names in held.items():
            self._hold(directory, names)
        self._reader = helper_pool(1, "frozen-read")  # loads of frozen chunks
        self._updates = self._first = None  # what close ends, should the build fail before making them
        try:
            if zeroth_order and self.activations in (ActivationMode.OFFLOAD, ActivationMode.AUTO):
                self.activations = ActivationMode.RECOMPUTE  # no backward, nothing to offload for
            elif self.activations is ActivationMode.AUTO and accumulation_steps > 1 and vertical is not False and \
                    vertical_blocker(model, self.plan, ActivationMode.RECOMPUTE) is None:
                # The vertical schedule (recompute only) reads every block once a step instead of once per
                # micro-batch: that saves more than offloading's avoided recompute wherever the state streams.
                self.activations = ActivationMode.RECOMPUTE
            else:  # before the parameters are bound to the chunks: "auto" reads their shapes
                self.activations = resolve(self.activations, model, machine, self.compute_dtype,
                                           self.swap_directory, self.device)
            self.vertical = _vertical(vertical, model, self.plan, self.activations, zeroth_order, accumulation_steps)
            self._blocks = block_states(layouts, self.store, optimizer, self.compute_dtype, plan=self.plan,
                                        weights=self._weights_dir, reader=self._reader, timers=timers)
            self._build_steps(prefetch, max_grad_norm, ClipMode(clip_mode), timers)
        except BaseException:  # a full swap disk while the weights go in: leave no files and no lock behind
            self.close()
            raise

    def _build_steps(self, prefetch: int, max_grad_norm: float | None, clip_mode: ClipMode, timers: Timers) -> None:
        """Fill the chunks, bind the parameters, then build the step that trains them and hook it in."""
        self.residency = Residency(self._blocks, self.store, self.compute_dtype, self.device, prefetch, timers)
        copy_weights_in(self._blocks, self.plan, self._weights_dir, self.residency.in_host)
        # Tied twins share the accumulated gradient under accumulation: see binding.bind_parameters.
        bind_parameters(self.model, self.plan, self._blocks, untie=self.accumulation_steps == 1,
                        dtype=self.compute_dtype, device=self.device)
        self.model.to(self.device)  # buffers only: every parameter is an empty placeholder by now
        self._zeroth = self._first = self._updates = None
        if isinstance(self.optimizer, MeZO):
            self._zeroth = ZerothOrderStep(self.model, self.residency, self.optimizer, timers, self.plan)
        else:
            clipping = Clipping(max_grad_norm, clip_mode, self._blocks, speculative=self._speculative)
            self._updates = UpdateWorker(self._blocks, self.store, self.optimizer, clipping, timers,
                                         release_spilled_grads=self._grads_consumed,
                                         queued=queue_depth(self._blocks, self._spare_bytes),
                                         single_threaded=self.device.type == "cpu")
            step = partial(VerticalStep, plan=self.plan) if self.vertical else FirstOrderStep
            self._first = step(self.model, self.residency, self._updates, clipping, timers)
        layer_call, runner = self._layer_call()
        _install_hooks(self.plan, self._blocks, self.residency, self._zeroth, layer_call, runner)
        if self._first is not None:
            outer = [p.module for p in self.plan.hook_points if not self._blocks[p.blocks[0]].block.is_layer]
            outer_gradients_into_chunks(outer, self.model, self.device, self.accumulation_steps, self.compute_dtype)

    def _layer_call(self) -> tuple[Any, LayerRunner | None]:
        """The streamed call the decoder layers run through (its `apply`), and the runner it reports their backward
        to."""
        if self.vertical:
            return VerticalCheckpoint, self._first
        if self.activations is ActivationMode.KEEP:
            return StreamedLayer, self._first
        if self.activations is ActivationMode.RECOMPUTE:
            return StreamedCheckpoint, self._first
        self._saved = ActivationStore(self.store.backend, self.device, limit_bytes=self._activation_memory)
        return OffloadedLayer, OffloadRunner(self._first, self._saved)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, optimizer: ChunkOptimizer | MeZO, budget: Budget | None = None, **options: Any
    ) -> Engine:
        """Build the model on the meta device and stream its weights from `path`'s safetensors, block by block,
        so a model larger than RAM never has to be whole in memory."""
        from transformers import AutoConfig

        return cls(meta_model(AutoConfig.from_pretrained(path)), optimizer, budget, weights=path, **options)

    @staticmethod
    def minimum_budget(
        model: nn.Module,
        optimizer: ChunkOptimizer | MeZO,
        *,
        compute_dtype: torch.dtype = torch.float32,
        quantize_frozen: str | None = None,
        accumulation_steps: int = 1,
    ) -> tuple[int, int]:
        """(device bytes, host bytes) below which `Engine(model, optimizer, ...)` refuses to start (with
        accumulation, a tied embedding's block is held through backward: pass the run's `accumulation_steps`)."""
        need = model_floors(model, optimizer, compute_dtype, quantize_frozen, accumulation_steps)
        return need.device, need.host

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
        return model_floors(model, optimizer, compute_dtype, quantize_frozen).state

    # ------------------------------------------------------------------------------------------- the step

    def train_step(self, batch: Batch | list[Batch]) -> float:
        """One optimizer step over `batch` (split into `accumulation_steps` micro-batches); returns the mean loss.

        Under exact clipping a step whose gradient norm is not finite changes nothing and is not counted in
        `step_count` (it warns once; `stats()["skipped_steps"]` counts them)."""
        micro = micro_batches(batch, self.accumulation_steps, self.device)
        if self._zeroth is not None:
            if len(micro) != 1:
                raise ValueError(f"MeZO takes one batch per step, got {len(micro)} micro-batches; join them")
            loss = self._zeroth.step(micro[0], self.step_count + 1)
            self.step_count += 1
            return loss
        self.step_count += 1
        loss = self._first(micro, self.step_count)
        if self._first.skipped:  # the gradient norm was not finite: nothing changed, the step is not counted
            if not self._warned_skip:
                warnings.warn(
                    f"Engine: step {self.step_count} was skipped: its gradient norm is not finite (inf or NaN) with "
                    f"loss {loss}; the weights and optimizer state are as before it. stats()['skipped_steps'] "
                    "counts such steps (this is warned about once)",
                    RuntimeWarning, stacklevel=2,
                )
                self._warned_skip = True
            self.step_count -= 1
        return loss

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        """Loss of the current weights on `batch`, without gradients or updates."""
        self._settle()
        self.model.eval()
        loss = self.model(**to_device(batch, self.device), use_cache=False).loss
        return float(loss)  # host sync: the loss value

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """`model.generate(input_ids, **options)` (transformers' decoding: greedy, sampling, streamers) on the
        current weights, each block held only while its forward runs, so a model larger than memory decodes
        within the budget. The KV cache grows outside the chunks: leave it room (`without_kv_cache`)."""
        self._settle()
        training = self.model.training
        self.model.eval()
        try:
            return self.model.generate(input_ids.to(self.device), **options)
        finally:
            self.model.train(training)

    def load_adapter(self, directory: str | Path) -> None:
        """Fill a peft model's adapter weights from an adapter directory (`save_adapter`'s or peft's layout); the
        frozen base stays as read from its files."""
        self._settle()
        copy_weights_in(self._blocks, self.plan, Path(directory), self.residency.in_host,
                        adapter_tensors=partial(adapter_tensors, self.model))

    def _settle(self) -> None:
        """Every update so far applied to the weights: before they are read outside a step."""
        if self._updates is not None:
            self._updates.wait()
        if self._zeroth is not None:
            self._zeroth.flush()

    # ----------------------------------------------------------------------------------------------- output

    def export(self, path: str | Path, dtype: torch.dtype | None = None, *, max_shard_size: int = 2 << 30) -> Path:
        """Write a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads.

        Weights stream from the chunks one block at a time (fp32 masters where they exist), cast to `dtype`
        (default: the dtype of the master weights, float32).
        """
        self._settle()
        return export_model(Path(path), self.model, self.plan, self.residency, dtype or torch.float32, max_shard_size)

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained adapter of a peft-wrapped model as `PeftModel.save_pretrained` does
        (adapter_config.json + adapter_model.safetensors, fp32), from the chunks, so that
        `PeftModel.from_pretrained(base, path)` loads it.

        Raises:
            ValueError: the model is not a peft model.
        """
        self._settle()
        return save_adapter(Path(path), self.model, self._blocks, self.residency.in_host)

    def _saves_adapter_only(self) -> bool:
        """A checkpoint of a peft model whose base is read from its files holds only the adapter: the base
        never changes and is read from the same files on resume."""
        return is_peft(self.model) and self._weights_dir is not None

    def save_checkpoint(self, directory: str | Path, extra: dict[str, Any] | None = None, *,
                        portable: bool | None = None) -> Path:
        """Write everything a resumed run needs into the new directory `directory`, atomically (see
        checkpoint.py), plus `extra`: whatever `torch.load(weights_only=True)` reads back (RNG states,
        data position, schedule).

        With a swap directory the checkpoint is in swap by default: it writes only what is still in memory, and
        references the swap files' versions, which then stay until `drop_checkpoint`, across this engine's close
        (the swap directory is kept while they are). `portable=True` copies the whole state into `directory`
        instead, so that it stands alone (the only kind without a swap directory).

        Raises:
            FileExistsError: `directory` exists.
            ValueError: `portable=False` without a swap directory.
        """
        in_swap = self.swap_area is not None if portable is None else not portable
        if in_swap and self.swap_area is None:
            raise ValueError("save_checkpoint(portable=False) needs a swap directory (Budget.nvme)")
        self._settle()
        adapter_only = self._saves_adapter_only()
        state = {
            "step": self.step_count,
            "optimizer": type(self.optimizer).__name__,
            "adapter_only": adapter_only,
            "optimizer_state": self.optimizer.state_dict(),
            "chunks": fingerprint(self._blocks, self.quantize_frozen),
            "extra": extra or {},
        }
        directory = Path(directory)
        if not in_swap:
            write_model = self.save_adapter if adapter_only else self.export
            return write_checkpoint(directory, write_model, self._blocks, self.residency.in_host, state)
        refs = self.store.commit(self._saved_chunks())
        names = [ref[0] for ref in refs.values() if ref is not None]
        state[SWAP_ENTRY] = {"area": str(self.swap_area.path), "chunks": refs}  # type: ignore[union-attr]
        try:
            write_swap_checkpoint(directory, state)
        except BaseException:
            self.store.drop(names)  # no checkpoint references them after all
            raise
        self._held[directory.resolve()] = names
        return directory

    def flush(self) -> None:
        """Write what is only in memory to the swap files, and fsync them: what a checkpoint in swap does first
        (it then finds nothing left to write), for a caller that wants that done ahead of it."""
        self._settle()
        self.store.flush()

    def drop_checkpoint(self, directory: str | Path) -> None:
        """Delete checkpoint `directory`, and the swap versions that no other kept checkpoint references."""
        directory = Path(directory)
        shutil.rmtree(directory, ignore_errors=True)  # first: a kill in between leaves versions, cleared at start
        names = self._held.pop(directory.resolve(), None)
        if names:
            self.store.drop(names)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer state and step count from `save_checkpoint`'s directory; returns `extra`.

        A checkpoint in swap is verified (every version file against its checksum) and then adopted: its versions
        become the chunks' files, unread and uncopied.

        Raises:
            ChecksumMismatch: a file of the checkpoint, or a swap version it references, is damaged or gone.
            ValueError: the directory is not a checkpoint, belongs to another model or optimizer, or keeps its
                state in another swap directory.
        """
        directory = Path(directory)
        state = read_engine_state(directory, optimizer=type(self.optimizer).__name__,
                                  expected=fingerprint(self._blocks, self.quantize_frozen))
        if self._updates is not None:
            self._updates.wait()
        if self._zeroth is not None:
            self._zeroth.discard_pending()  # the loaded weights replace what it would have updated
        if SWAP_ENTRY in state:
            self._adopt(directory, state[SWAP_ENTRY])
        else:
            adapter = partial(adapter_tensors, self.model) if state.get("adapter_only", False) else None
            copy_weights_in(self._blocks, self.plan, directory, self.residency.in_host, adapter_tensors=adapter)
            restore_states(directory, self._blocks, self.residency.in_host)
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.step_count = state["step"]
        return state["extra"]

    def _adopt(self, directory: Path, swap: dict[str, Any]) -> None:
        """Make the versions checkpoint `directory` references the chunks' contents, after checking each."""
        ours = self.swap_area.path if self.swap_area is not None else None
        if ours is None or os.path.realpath(swap["area"]) != os.path.realpath(ours):
            raise ValueError(
                f"checkpoint {directory} keeps its state in the swap files of {swap['area']}, and this engine's "
                f"are {'nowhere (no Budget.nvme)' if ours is None else f'in {ours}'}: resume with the swap directory "
                "and run name it was trained with"
            )
        refs = swap["chunks"]
        for key, ref in refs.items():
            if ref is not None:
                verify_version(self.store.version_path(ref[0]), ref[1], key, directory)
        if directory.resolve() not in self._held:  # not named at construction: its versions are here all the same
            self._hold(directory, [ref[0] for ref in refs.values() if ref is not None])
        for chunk in self._saved_chunks():
            self.store.adopt(chunk, refs[chunk.key])

    def _hold(self, directory: Path, names: list[str]) -> None:
        self.store.hold(names)
        self._held[directory.resolve()] = names

    def _saved_chunks(self) -> list[Chunk]:
        """The chunks a checkpoint holds: what training changes (a frozen chunk is rebuilt from the model)."""
        trainable = [(s.weights, s.master, *s.states.values()) for s in self._blocks]
        return [chunk for chunks in trainable for chunk in chunks if chunk is not None]

    # -------------------------------------------------------------------------------------- introspection

    @property
    def blocks(self) -> list[BlockState]:
        """Every block's chunks and parameters, in model order: for tests and benchmarks to look at, not to change."""
        return self._blocks

    @property
    def swap_directory(self) -> Path | None:
        """Where this engine's swap files are (a private directory inside `budget.nvme`), or None without one."""
        return self.swap_area.path if self.swap_area is not None else None

    @property
    def swap_reclaimed(self) -> int:
        """Bytes of swap files a killed earlier process of the same `run_name` left, removed at construction."""
        return self.swap_area.reclaimed if self.swap_area is not None else 0

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of chunks in memory now, per tier ("device", "host"), for progress displays."""
        return self.store.resident_bytes()

    @property
    def grad_norm(self) -> float | None:
        """The last step's gradient norm over the whole model, as `clip_grad_norm_` returns it (before clipping),
        where exact clipping computes it; None otherwise (no clipping, per-block clipping, MeZO)."""
        return self._first.grad_norm if self._first is not None else None

    def stats(self) -> dict[str, int]:
        """Bytes moved and peak bytes per tier so far; the steps exact clipping skipped (gradient norm not finite:
        `skipped_steps`) and rolled back and redone clipped (`redone_steps`, clipping.py); with
        activations="offload", also the activations' bytes written and read back and the most host memory they held
        at once (activations.py)."""
        return {
            "bytes_read": self.store.bytes_read,
            "bytes_written": self.store.bytes_written,
            "peak_device": self.store.peak[Tier.DEVICE],
            "peak_host": self.store.peak[Tier.HOST],
            "skipped_steps": self._first.skipped_steps if self._first is not None else 0,
            "redone_steps": self._first.redone_steps if self._first is not None else 0,
            **(self._saved.stats() if self._saved is not None else {}),
        }

    def close(self) -> None:
        """Wait for pending work and remove the swap files (unless keep_swap)."""
        if self._updates is not None:
            self._updates.close()
        if self._first is not None:
            self._first.close()
        self.store.close()
        self._reader.shutdown(wait=True)
        if self._saved is not None:
            self._saved.close()  # its file is in the backend's directory: before the backend closes
        if self.store.backend is not None:
            self.store.backend.close()
        if self.swap_area is not None:
            self.swap_area.close(keep=self._keep_swap)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vertical(asked: bool | None, model: nn.Module, plan: BlockPlan, activations: ActivationMode,
              zeroth_order: bool, accumulation_steps: int) -> bool:
    """Whether the vertical schedule runs (`Engine`'s `vertical`).

    Raises:
        ValueError: `vertical=True` where it would not be exact.
    """
    blocker = "MeZO has no backward to schedule" if zeroth_order else vertical_blocker(model, plan, activations)
    if asked and blocker is not None:
        raise ValueError(f"Engine: vertical=True, but {blocker}; drop vertical=True to run one micro-batch "
                         "after another")
    return asked is not False and blocker is None and accumulation_steps > 1


def _held_versions(checkpoints: Iterable[str | Path], nvme: str | Path | None,
                   run_name: str | None) -> dict[Path, list[str]]:
    """The swap versions each of `checkpoints` references, for those saved in swap in this run's directory."""
    if nvme is None or run_name is None:
        return {}
    area = os.path.realpath(Path(nvme) / f"{AREA_PREFIX}{run_name}")
    held = {}
    for directory in map(Path, checkpoints):
        swap = swap_references(directory)
        if swap is not None and os.path.realpath(swap["area"]) == area:
            held[directory] = [ref[0] for ref in swap["chunks"].values() if ref is not None]
    return held


def _check_settings(
    model: nn.Module,
    optimizer: ChunkOptimizer | MeZO,
    prefetch: int,
    accumulation_steps: int,
    max_grad_norm: float | None,
    compute_dtype: torch.dtype | None,
    quantize_frozen: str | None,
) -> None:
    """Every bad setting at once, each with its value and the fix.

    Raises:
        ValueError: one message listing them.
    """
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
            errors.append("MeZO needs compute_dtype=torch.float32: it perturbs and updates the weights themselves; "
                          "for bf16 weights in memory and on disk use MeZO(storage_dtype=torch.bfloat16)")
        if any(not p.requires_grad for p in model.parameters()):
            errors.append("MeZO with frozen parameters (requires_grad=False) is not supported yet; train them all")
    if errors:
        raise ValueError("Engine: " + "; ".join(errors))


def _install_hooks(
    plan: BlockPlan,
    blocks: list[BlockState],
    residency: Residency,
    zeroth: ZerothOrderStep | None,
    layer_call: Any,
    runner: LayerRunner | None,
) -> None:
    """Hold each module's blocks around its forward; stream each layer's backward through `layer_call`.

    Hook order on a module: the residency pre-hook (hold) runs before the zeroth-order pre-hook, and the
    zeroth-order post-hook (registered with prepend) before the residency post-hook (release), so the perturbed
    passes run while the blocks are held."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for point in plan.hook_points:
        point.module.register_forward_pre_hook(partial(residency.before_forward, point.blocks))
        point.module.register_forward_hook(partial(residency.after_forward, point.blocks))
        if zeroth is not None:
            zeroth.install(point.module, point.blocks)
        if len(point.blocks) == 1 and blocks[point.blocks[0]].block.is_layer:
            if not isinstance(point.module, GradientCheckpointingLayer):
                raise ValueError(
                    f"{type(point.module).__name__} ({point.name}) does not support gradient checkpointing, "
                    "which streaming needs; this architecture is not supported yet"
                )
            point.module.gradient_checkpointing = True
            # The layer's call goes through the streamed function, which reports its backward to `runner`.
            point.module._gradient_checkpointing_func = partial(layer_call.apply, runner, point.blocks[0],
                                                                residency.device)
