"""The engines the tests of minibt/engine/ share: built once per session on the tiny 4-bit Llama."""

from __future__ import annotations

import pytest
import torch

from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection, TrainSection
from tiny_engine import pairs

STEPS = TrainSection(epochs=1, max_steps=12, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0)


@pytest.fixture(scope="session")
def engine(tiny_model_dir, tmp_path_factory) -> Engine:
    """myx and m0 trained 12 steps on the same rows. Tests that add adapters delete them again."""
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=128), LoraSection(r=8, alpha=16), seed=0)
    work = tmp_path_factory.mktemp("work")
    for name in ("myx", "m0"):
        e.train(name, pairs(e), STEPS, work / name)
    return e


@pytest.fixture(scope="session")
def random_lora_engine(tiny_model_dir) -> Engine:
    """Untrained adapters myx and rater whose LoRA B is random (fresh ones are zero): outputs differ from
    the base's without any training; a context of 256 tokens for long shared heads."""
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=256), LoraSection(r=8, alpha=16), seed=0)
    e.add_adapter("myx")
    e.add_adapter("rater")
    with torch.no_grad():
        for name, p in e.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return e
