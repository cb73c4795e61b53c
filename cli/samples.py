"""`run --sample-every N`: a few generations from held-out prompts during training, to see what the model does
beside what its loss says.

The prompts are the first sequences of the validation set (of the training set when there is none): the part
before the first supervised token where a row has one (a prompt/completion or chat row; a text row supervises
every token after its BOS), else its first `PROMPT_TOKENS` tokens. Decoding is greedy, so two runs of the same
checkpoint write the same samples. They go to metrics.jsonl (`{"step", "samples": [{"prompt", "prompt_ids",
"completion"}]}`) and to the terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model import pad_id
from .sequences import Sequences

__all__ = ["SAMPLE_PROMPTS", "Samples", "sample_prompts"]

SAMPLE_PROMPTS = 2  # prompts per sampling
PROMPT_TOKENS = 16  # of a text row, which has no prompt of its own
NEW_TOKENS = 32
IGNORED = -100  # the label of a token the loss does not count (a prompt's)


def sample_prompts(sequences: Sequences, count: int = SAMPLE_PROMPTS) -> list[list[int]]:
    """The prompts of the first `count` rows of `sequences` (see the module's docstring)."""
    prompts = []
    for index in range(min(count, len(sequences))):
        ids = sequences.values(index, "input_ids")
        supervised = np.flatnonzero(sequences.values(index, "labels") != IGNORED)
        end = int(supervised[0]) if len(supervised) and supervised[0] > 1 else PROMPT_TOKENS  # a text row: BOS
        prompts.append(ids[:max(1, min(end, len(ids) - 1))].tolist())
    return prompts


@dataclass
class Samples:
    """Greedy completions of fixed prompts, through the training engine (its current weights)."""

    prompts: list[list[int]]
    tokenizer: Any

    def generate(self, engine: Any) -> list[dict[str, str]]:
        """Each prompt and its completion, as text. Greedy decoding in eval mode draws no random numbers, so the
        run's RNG (dropout masks after this) is as it was: a run with samples equals one without."""
        samples = []
        for prompt in self.prompts:
            out = engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad_id(self.tokenizer))
            samples.append({"prompt": self.tokenizer.decode(prompt, skip_special_tokens=True), "prompt_ids": prompt,
                            "completion": self.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)})
        return samples
