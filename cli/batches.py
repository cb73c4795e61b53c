"""Which sequences each optimizer step sees, as a pure function of the step number.

Epoch e visits the training sequences in the order `randperm(n)` seeded with (seed, e), and step s takes the
next batch_size * accumulation_steps of them. The data position is then just the step number: a run resumed
at step s sees exactly the batches the uninterrupted run saw, with no iterator state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .packed_attention import block_causal_mask, packed_positions
from .sequences import IGNORE, Sequences

__all__ = ["Batches", "collate", "eval_batches"]


class Batches:
    """Micro-batches for each step of a run over `sequences`."""

    def __init__(self, sequences: Sequences, *, batch_size: int, accumulation_steps: int, seed: int,
                 pad_id: int, packed_mask: torch.dtype | None = None) -> None:
        """`packed_mask`: for packed sequences and a model that does not separate them by position restarts, the
        dtype of the explicit mask (cli/packed_attention.py)."""
        self.sequences, self.batch_size, self.accumulation_steps = sequences, batch_size, accumulation_steps
        self.seed, self.pad_id, self.packed_mask = seed, pad_id, packed_mask
        self._orders: dict[int, list[int]] = {}

    @property
    def per_step(self) -> int:
        """Sequences consumed by one optimizer step."""
        return self.batch_size * self.accumulation_steps

    def steps_for_epochs(self, epochs: float) -> int:
        """Steps that make `epochs` passes over the data (at least one step)."""
        return max(1, -(-int(epochs * len(self.sequences)) // self.per_step))

    def epoch_of(self, step: int) -> float:
        """Passes over the data completed after `step`."""
        return step * self.per_step / len(self.sequences)

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step `step` (1 for the first), as the engine's `train_step` takes."""
        indices = self._indices(step)
        return [
            collate(self.sequences, indices[m : m + self.batch_size], self.pad_id, packed_mask=self.packed_mask)
            for m in range(0, self.per_step, self.batch_size)
        ]

    def tokens(self, step: int) -> int:
        """Tokens (padding not counted) in the micro-batches of step `step`."""
        return sum(self.sequences.length(i) for i in self._indices(step))

    def _indices(self, step: int) -> list[int]:
        first = (step - 1) * self.per_step
        return [self._index(first + k) for k in range(self.per_step)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.sequences))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.sequences), generator=generator).tolist()}
        return self._orders[epoch][offset]


def collate(sequences: Sequences, indices: list[int], pad_id: int, *,
            packed_mask: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Right-pad the chosen sequences to the longest; padding is masked out of attention and loss.

    Unpacked sequences get a 2-D attention_mask. Packed ones get position_ids that restart at each example (0 on
    padding) and no 2-D mask, transformers' packed format, or with `packed_mask` also the explicit 4-D mask in
    that dtype (cli/packed_attention.py).
    """
    length = max(sequences.length(i) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)  # (batch, length)
    labels = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    position_ids = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        ids, targets, starts = sequences.arrays(i)
        n = len(ids)
        input_ids[row, :n] = torch.from_numpy(ids.astype(np.int64))  # a copy: the table's pages are read-only
        labels[row, :n] = torch.from_numpy(targets.astype(np.int64))
        attention_mask[row, :n] = 1
        if starts is not None:
            position_ids[row] = packed_positions(starts, n, length)
    if not sequences.packed:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if packed_mask is not None:
        batch["attention_mask"] = block_causal_mask(position_ids, packed_mask)  # (batch, 1, length, length)
    return batch


def eval_batches(sequences: Sequences, batch_size: int, pad_id: int, *,
                 packed_mask: torch.dtype | None = None) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Every sequence once, in order, with the number of predicted tokens in each batch. The caller weights
    each batch's mean loss by that number, which makes the eval loss a per-token mean over the whole set."""
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences, list(range(start, min(start + batch_size, len(sequences)))), pad_id,
                        packed_mask=packed_mask)
        yield batch, int((batch["labels"][:, 1:] != IGNORE).sum())
