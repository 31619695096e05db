"""An engine the inference stages' tests share: the tiny 4-bit Llama (tests/conftest.py) with adapters
myx and m0 whose LoRA weights are random (fresh ones are zero, which would make them the base)."""

from __future__ import annotations

import pytest
import torch

from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection

CONTEXT = 256


@pytest.fixture(scope="session")
def stage_engine(tiny_model_dir) -> Engine:
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=CONTEXT), LoraSection(r=4, alpha=8), seed=0)
    for name in ("myx", "m0"):
        e.add_adapter(name)
    with torch.no_grad():
        for name, p in e.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return e
