"""An engine that is done with lets go of its model and its chunks' memory, closed or merely dropped."""

from __future__ import annotations

import gc
import weakref

import pytest
from tiny_models import random_batch, save_tiny_model
from transformers import AutoModelForCausalLM

from finetune import offload, optim


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "dropped"])
@pytest.mark.parametrize("activations", ["recompute", "offload"])
def test_a_finished_engine_is_collected(tmp_path, closed, activations):
    path = save_tiny_model("llama", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    budget = offload.Budget(device="4MB", host="4MB", nvme=tmp_path / "swap")
    engine = offload.Engine(model, optim.AdamW(lr=1e-3), budget, activations=activations)
    engine.train_step(random_batch(model.config.vocab_size))
    gone = [weakref.ref(model), weakref.ref(engine.store)]  # the store owns every chunk and its memory
    if closed:
        engine.close()
    del model, engine
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
