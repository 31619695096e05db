"""The NF4 base dequantized (minibt/engine/dequantize.py): the weights the 4-bit model computes with, as a
plain 16-bit folder, written once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minibt import prompts
from minibt.engine import Engine, load_base
from minibt.engine import dequantize
from minibt.engine.dequantize import dequantized_base, dequantized_state
from minibt.errors import MinibtError
from minibt.recipe import LoraSection, ModelSection
from tiny_engine import WORDS

IDS = torch.tensor([[1, 5, 9, 20, 33, 40, 50, 61, 70, 2]])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minibt-cache")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_the_folder_computes_what_the_nf4_model_computes(tiny_model_dir, cache):
    from transformers import AutoModelForCausalLM

    cfg = ModelSection(name=tiny_model_dir, max_length=128)
    folder = Path(dequantized_base(cfg, cache))
    assert folder.parent == cache / "dequantized" and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    nf4, _ = load_base(cfg)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert plain.dtype == torch.float32 and not any("4bit" in type(m).__name__ for m in plain.modules())
    want = logits(nf4)
    assert torch.allclose(logits(plain), want, atol=1e-5, rtol=0)
    # the original 16-bit weights compute something else: what the folder is for
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (logits(original) - want).abs().max() > 1e-2


def test_written_once_atomically_and_keyed_by_weights_and_dtype(tiny_model_dir, cache, monkeypatch, tmp_path):
    cfg = ModelSection(name=tiny_model_dir, max_length=128)
    folder = dequantized_base(cfg, cache)
    monkeypatch.setattr(dequantize, "load_base", lambda cfg: pytest.fail("loaded again"))
    assert dequantized_base(cfg, cache) == folder
    assert not [p for p in (cache / "dequantized").iterdir() if p.name.startswith(".")]  # no half-written folder left
    assert dequantize.cache_key(dataclasses.replace(cfg, dtype="bfloat16")) != Path(folder).name
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    assert dequantize.cache_key(dataclasses.replace(cfg, name=str(changed))).split("-")[-1] == Path(folder).name.split("-")[-1]
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert dequantize.cache_key(dataclasses.replace(cfg, name=str(changed))).split("-")[-1] != Path(folder).name.split("-")[-1]


def test_an_unquantized_base_is_its_own_name(tiny_model_dir, cache):
    assert dequantized_base(ModelSection(name=tiny_model_dir, quantization="none"), cache) == tiny_model_dir


def test_repacked_weights_are_refused(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = load_base(ModelSection(name=tiny_model_dir, max_length=128))
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' CPU repacking sets
    with pytest.raises(MinibtError, match="repacked"):
        dequantized_state(model, torch.float32)


def test_a_trained_adapter_scores_the_same_on_the_folder_as_on_nf4(engine, cache, tmp_path):
    """The session's nf4 engine with m0 (trained on the 4-bit base) against a 16-bit engine on the folder
    with the same adapter: the rubric's five digit probabilities agree to float precision."""
    engine.save_adapter("m0", tmp_path / "m0")
    folder = dequantized_base(engine.model_cfg, cache)
    plain = Engine.load(dataclasses.replace(engine.model_cfg, name=folder, quantization="none", dtype="float32"),
                        LoraSection(r=8, alpha=16), seed=0)
    plain.load_adapter("m0", tmp_path / "m0")
    texts = [engine.text.render(prompts.rubric_messages(f"what is the {w}", f"the {w} is red.")) for w in WORDS]
    want, want_mass = engine.infer.next_token_probs("m0", texts, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
    got, mass = plain.infer.next_token_probs("m0", texts, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
    assert np.abs(got - want).max() < 1e-5 and np.allclose(mass, want_mass, rtol=1e-4)
    original = Engine.load(dataclasses.replace(engine.model_cfg, quantization="none", dtype="float32"),
                           LoraSection(r=8, alpha=16), seed=0)
    original.load_adapter("m0", tmp_path / "m0")
    other, _ = original.infer.next_token_probs("m0", texts, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
    assert np.abs(other - want).max() > 1e-3  # the original weights: other scores (0.004 here)
