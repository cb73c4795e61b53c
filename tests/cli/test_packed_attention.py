"""Packing without cross-talk: a packed batch gives each example the loss it has alone.

Reference: each example run by itself through the same model (plain transformers, batch of one, no padding), its
loss the mean cross-entropy of its own targets. The packed batch comes from the real path: the examples cut into
packed sequences by cli/sequences.py, collated by cli/batches.py (position restarts, or the explicit mask for a
model that ignores them), and run through plain transformers and through the engine (first-order with the batch
split into micro-batches, and MeZO, whose step repeats the batch once per perturbed pass).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_support import assert_same_run, interrupt_at, run_finetune, summary
from datasets import Dataset
from tiny_models import ARCHITECTURES, VOCAB, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim
from finetune.cli.batches import collate
from finetune.cli.packed_attention import block_causal_mask, honours_packed_positions
from finetune.cli.sequences import IGNORE, Cut, Sequences, build_sequences

TOLERANCE = 1e-5
LENGTHS = [(7, 3), (5, 1), (9, 4), (4, 2), (6, 0), (8, 5)]  # (tokens, of which prompt) per example
PAIRS = [(7, 3), (5, 0), (8, 4), (4, 0)]  # two by two, 12 tokens a pair


def _examples(seed: int = 0, lengths: list[tuple[int, int]] = LENGTHS) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per example: random tokens, a prompt (IGNORE labels) then a completion, as cli/data.py
    makes them. Without a prompt, the first token is a label too (text without BOS, a chat with --train-on-prompt),
    which nothing may predict in a packed sequence either."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        examples.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return examples


def _pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> Sequences:
    """The examples through cli/sequences.py's packing, as `finetune run --pack` cuts them."""
    def encode(rows: list[dict], first: int) -> list[tuple[int, list[int], list[int]]]:
        return [(first + k, *examples[row["example"]]) for k, row in enumerate(rows)]

    rows = Dataset.from_list([{"example": k} for k in range(len(examples))])
    return build_sequences(rows, encode, seq_len=seq_len, cut=Cut.PACK, source="examples")


def _alone(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    """(mean loss, targets) of each example run by itself."""
    results = []
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            results.append(_loss(logits, torch.tensor(labels)))
    return [result for result in results if result[1]]


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Mean cross-entropy of the targets (the model shifts: position t predicts label t + 1)."""
    targets = labels[1:]
    losses = torch.nn.functional.cross_entropy(logits[:-1].double(), targets.clamp(min=0), reduction="none")
    kept = targets != IGNORE
    return float(losses[kept].mean()), int(kept.sum())


def _per_example_packed(logits: torch.Tensor, batch: dict, sequences: Sequences) -> list[tuple[float, int]]:
    """(mean loss, targets) of each example inside the packed rows of `batch`, read from its logits."""
    results = []
    for row in range(len(sequences)):
        _, _, starts = sequences.arrays(row)
        bounds = [*starts.tolist(), sequences.length(row)]
        for begin, end in zip(bounds[:-1], bounds[1:]):
            results.append(_loss(logits[row, begin:end], batch["labels"][row, begin:end]))
    return [result for result in results if result[1]]  # a piece cut off with nothing to predict is no example


def _model(arch: str, tmp_path: Path, attention: str = "sdpa") -> tuple[Path, torch.nn.Module]:
    path = save_tiny_model(arch, tmp_path / arch)
    return path, AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("explicit_mask", [False, True], ids=["positions", "mask"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_losses_equal_each_example_alone(arch: str, attention: str, explicit_mask: bool,
                                                tmp_path: Path) -> None:
    """Both ways of keeping examples apart: position restarts alone (transformers' packed format, what these models
    get) and the explicit block-diagonal mask (what a model that ignores the restarts gets)."""
    _, model = _model(arch, tmp_path, attention)
    assert honours_packed_positions(model)
    examples = _examples()
    sequences = _pack(examples, seq_len=16)
    assert len(sequences) > 1 and any(len(sequences.arrays(r)[2]) > 1 for r in range(len(sequences)))
    batch = collate(sequences, list(range(len(sequences))), pad_id=0,
                    packed_mask=torch.float32 if explicit_mask else None)
    assert ("attention_mask" in batch) is explicit_mask
    with torch.no_grad():
        output = model(**batch, use_cache=False)
    packed = _per_example_packed(output.logits, batch, sequences)
    # A sequence that begins in the middle of an example (cut by --seq-len) is compared with that piece alone.
    pieces = [(batch["input_ids"][r, b:e].tolist(), batch["labels"][r, b:e].tolist())
              for r in range(len(sequences))
              for b, e in zip(sequences.arrays(r)[2].tolist(), [*sequences.arrays(r)[2].tolist()[1:],
                                                                  sequences.length(r)])]
    alone = _alone(model, pieces)
    assert [n for _, n in packed] == [n for _, n in alone]
    torch.testing.assert_close([loss for loss, _ in packed], [loss for loss, _ in alone], atol=TOLERANCE, rtol=0)
    # The batch's loss (transformers' mean over its targets) is the examples' token-weighted mean: no target
    # crosses a boundary (Note [Packed boundaries]).
    weighted = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert float(output.loss) == pytest.approx(weighted, abs=TOLERANCE)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gets_what_keeps_its_examples_apart(arch: str, tmp_path: Path) -> None:
    """The run's own choice (cli/train.py: position restarts where `honours_packed_positions` reads that the model
    builds its mask from them, else the explicit mask) on every architecture the suite builds: a wrong "yes" from
    reading the source, after a transformers upgrade say, fails here as cross-talk."""
    _, model = _model(arch, tmp_path)
    examples = _examples(seed=2)
    sequences = _pack(examples, seq_len=64)  # one sequence holding every example
    batch = collate(sequences, [0], pad_id=0,
                    packed_mask=None if honours_packed_positions(model) else torch.float32)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    alone = _alone(model, [(ids, [IGNORE, *labels[1:]]) for ids, labels in examples])
    torch.testing.assert_close([loss for loss, _ in _per_example_packed(logits, batch, sequences)],
                               [loss for loss, _ in alone], atol=TOLERANCE, rtol=0)


def test_a_model_that_ignores_position_restarts_gets_the_mask(tmp_path: Path) -> None:
    """OPT builds its mask without position_ids (transformers 5.24): restarts alone would let its examples attend
    to each other, so it is given the explicit mask, and that keeps them apart."""
    _, model = _model("opt", tmp_path)
    assert not honours_packed_positions(model)
    examples = _examples(seed=1)
    sequences = _pack(examples, seq_len=64)  # one sequence holding every example
    batch = collate(sequences, [0], pad_id=0, packed_mask=torch.float32)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        leaky = model(**{k: v for k, v in batch.items() if k != "attention_mask"}, use_cache=False).logits
    alone = _alone(model, [(ids, [IGNORE, *labels[1:]]) for ids, labels in examples])
    torch.testing.assert_close([loss for loss, _ in _per_example_packed(logits, batch, sequences)],
                               [loss for loss, _ in alone], atol=TOLERANCE, rtol=0)
    assert _per_example_packed(leaky, batch, sequences)[1][0] != pytest.approx(alone[1][0], abs=1e-3)


def test_block_causal_mask_keeps_examples_and_padding_apart() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])  # examples of 3 and 2 tokens, then two padding tokens
    allowed = block_causal_mask(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


# ------------------------------------------------------------------------------------------------ the engine


def _rows_of_pairs(examples: list[tuple[list[int], list[int]]]) -> tuple[Sequences, Sequences]:
    """The examples two by two: packed (one sequence per pair) and unpacked (each pair two padded rows)."""
    packed = _pack(examples, seq_len=12)
    assert len(packed) == len(examples) // 2  # each sequence holds exactly one pair
    plain = Sequences([ids for ids, _ in examples], [[IGNORE, *labels[1:]] for _, labels in examples])
    return packed, plain


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_trains_on_a_packed_batch_as_on_its_examples(arch: str, tmp_path: Path) -> None:
    """First-order: a step over 2 packed rows split into 2 micro-batches by the engine, against the same examples
    as 2 micro-batches of 2 padded rows each. The same examples in each micro-batch give the same mean loss, and so
    the same gradients: the second step's loss (after an update) and the eval loss agree too."""
    path = save_tiny_model(arch, tmp_path / arch)
    examples = _examples(lengths=PAIRS)
    packed, plain = _rows_of_pairs(examples)
    losses = {}
    for name, sequences in (("packed", packed), ("plain", plain)):
        model = AutoModelForCausalLM.from_pretrained(path)
        adamw = optim.AdamW(lr=1e-3)
        device, host = offload.Engine.minimum_budget(model, adamw, accumulation_steps=2)
        budget = offload.Budget(device=device, host=host, nvme=tmp_path / f"swap-{name}")
        with offload.Engine(model, adamw, budget, accumulation_steps=2) as engine:
            batch = collate(sequences, list(range(len(sequences))), pad_id=0)
            steps = [engine.train_step(batch) for _ in range(2)]
            losses[name] = [*steps, engine.eval_loss(batch)]
    assert "position_ids" in collate(packed, [0, 1], pad_id=0)
    torch.testing.assert_close(losses["packed"], losses["plain"], atol=TOLERANCE, rtol=0)


def test_mezo_step_on_a_packed_batch_equals_its_examples(tmp_path: Path) -> None:
    """MeZO repeats the batch once per perturbed pass and cuts each layer's inputs (the packed mask that
    transformers builds from position_ids among them) back to the pass's rows: its losses must be those of the
    same examples unpacked."""
    path = save_tiny_model("llama", tmp_path / "llama")
    examples = _examples(lengths=PAIRS[:2])
    packed, plain = _rows_of_pairs(examples)
    losses = {}
    for name, sequences in (("packed", packed), ("plain", plain)):
        model = AutoModelForCausalLM.from_pretrained(path)
        mezo = optim.MeZO(lr=1e-3, seed=3)
        device, host = offload.Engine.minimum_budget(model, mezo)
        with offload.Engine(model, mezo, offload.Budget(device=device, host=host, nvme=tmp_path / f"swap-{name}")) \
                as engine:
            batch = collate(sequences, list(range(len(sequences))), pad_id=0)
            losses[name] = [engine.train_step(batch) for _ in range(3)]
    torch.testing.assert_close(losses["packed"], losses["plain"], atol=TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.integration
def test_packed_run_resumed_after_sigkill_equals_uninterrupted_run(run_args, env, tmp_path: Path) -> None:
    """`finetune run --pack` end to end: batches without a 2-D mask (position_ids), the eval loss over packed
    sequences, and exact resume, the resumed run reading its tokens from the cache the first one filled."""
    reference = tmp_path / "reference"
    result = summary(run_finetune(env, *run_args(reference), "--pack", "--json"))
    assert result["status"] == "completed" and result["step"] == 24
    steps = [record for record in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
             if "loss" in record]
    assert all(0 < record["tokens"] <= 4 * 24 for record in steps)  # counted without a 2-D attention_mask
    output = tmp_path / "run"
    killed = interrupt_at(env, [*run_args(output), "--pack"], output, 10, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    entries = sorted(Path(env["FINETUNE_CACHE_DIR"], "tokens").iterdir())
    resumed = summary(run_finetune(env, "run", "--resume", "--output", output, "--json"))
    assert resumed["step"] == 24
    assert_same_run(output, reference)
    assert sorted(Path(env["FINETUNE_CACHE_DIR"], "tokens").iterdir()) == entries  # no new entry
