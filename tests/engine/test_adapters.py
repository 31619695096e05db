"""Role adapters on one 4-bit base (minibt/engine/adapters.py): switching, trainable checks, reloads, names."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from minibt.engine.adapters import adapter_of
from minibt.errors import MinibtError
from minibt.recipe import TrainSection
from tiny_engine import WORDS, lora_state, pairs


def test_only_the_active_role_is_trainable_after_switches(engine):
    for name in ("m0", "myx", "m0"):
        with engine.use(name, trainable=True):
            engine.check_trainable(name)
            assert all(p.requires_grad == (adapter_of(n) == name) for n, p in engine.model.named_parameters())
        with engine.use(name):
            engine.check_trainable(None)


def test_generation_with_an_adapter_differs_from_the_base(engine):
    prompt = [pairs(engine, 1)[0]["prompt"]]
    with_adapter = engine.infer.generate("m0", prompt, max_new_tokens=6)
    base = engine.infer.generate("base", prompt, max_new_tokens=6)
    assert with_adapter != base


def test_switching_adapters_switches_what_the_model_says(engine, tmp_path):
    """Two adapters trained on different answers to the same prompts: each greedy output is its own
    adapter's answer, and switching back and forth (through the base) reproduces each exactly."""
    cfg = TrainSection(epochs=1, max_steps=40, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, save_steps=0)
    prompts = [engine.text.render([{"role": "user", "content": f"what is the {w}"}]) for w in WORDS]
    for name, color in (("red", "red"), ("blue", "blue")):
        rows = [{"prompt": p, "completion": f"the {w} is {color}."} for p, w in zip(prompts, WORDS)] * 2
        engine.train(name, rows, cfg, tmp_path / name)
    try:
        first = {name: engine.infer.generate(name, prompts, max_new_tokens=8) for name in ("red", "blue", "base")}
        assert sum("red" in t for t in first["red"]) >= 6 and not any("blue" in t for t in first["red"]), first
        assert sum("blue" in t for t in first["blue"]) >= 6 and not any("red" in t for t in first["blue"]), first
        for name in ("blue", "base", "red", "blue", "red", "base"):
            assert engine.infer.generate(name, prompts, max_new_tokens=8) == first[name], f"{name} after a switch"
    finally:
        engine.delete_adapter("red")
        engine.delete_adapter("blue")


def test_adapters_reload_from_disk_with_the_same_scores(engine, tmp_path):
    prompts = [p["prompt"] for p in pairs(engine, 4)]
    before, _ = engine.infer.next_token_probs("m0", prompts, "Score:", list("12345"))
    engine.save_adapter("m0", tmp_path / "m0")
    assert (tmp_path / "m0" / "adapter_model.safetensors").exists()
    assert (tmp_path / "m0" / "chat_template.jinja").exists() or "chat_template" in (tmp_path / "m0" / "tokenizer_config.json").read_text()
    config = json.loads((tmp_path / "m0" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(engine.lora.target_modules)  # not the set's per-process order
    engine.load_adapter("m0_again", tmp_path / "m0")
    after, _ = engine.infer.next_token_probs("m0_again", prompts, "Score:", list("12345"))
    assert after == pytest.approx(before, abs=1e-6)
    engine.delete_adapter("m0_again")


def test_a_new_adapter_is_seeded_by_its_name_and_leaves_the_global_generator_alone(engine):
    state = torch.random.get_rng_state()
    engine.add_adapter("fresh")
    first = lora_state(engine, "fresh")
    assert torch.equal(torch.random.get_rng_state(), state), "adding an adapter moved torch's global generator"
    engine.delete_adapter("fresh")
    torch.manual_seed(12345)  # whatever the global generator holds, the same name gives the same weights
    engine.add_adapter("fresh")
    again = lora_state(engine, "fresh")
    engine.delete_adapter("fresh")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    engine.add_adapter("other")
    other = lora_state(engine, "other")
    engine.delete_adapter("other")
    assert not all(torch.equal(a, b) for a, b in zip(first.values(), other.values())), "another name, another init"


def test_adapter_names_are_checked(engine):
    with pytest.raises(MinibtError, match="reserved"):
        engine.add_adapter("forward")  # collides with nn.Module.forward inside peft
    with pytest.raises(MinibtError, match="does not exist"):
        engine.infer.generate("m7", ["x"], max_new_tokens=1)


# --- inference with the adapter folded into a float32 base ---------------------------------------


def test_a_float32_base_runs_an_adapter_folded_and_is_left_untouched(tiny_model_dir, tmp_path, monkeypatch):
    """On a plain float32 base an inference call runs the adapter folded into the weights (no LoRA
    matmuls): the same scores and texts as the LoRA path, and the base's own tensors come back as they
    were. A 4-bit base is never folded."""
    from minibt.engine import Engine, adapters
    from minibt.recipe import LoraSection, ModelSection

    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=128, quantization="none", dtype="float32"),
                    LoraSection(r=8, alpha=16), seed=0)
    e.train("m0", pairs(e), TrainSection(epochs=1, max_steps=6, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0), tmp_path)
    layers = adapters.foldable(e.model, "m0")
    assert layers
    before = [(m.base_layer.weight.data_ptr(), m.base_layer.weight.detach().clone()) for m in layers]
    lora_calls: list[int] = []
    layers[0].lora_A["m0"].register_forward_hook(lambda *_: lora_calls.append(1))
    prompts = [p["prompt"] for p in pairs(e, 6)]
    scores, _ = e.infer.next_token_probs("m0", prompts, "Score:", list("12345"))
    texts = e.infer.generate("m0", prompts, max_new_tokens=8)
    assert not lora_calls  # folded: the LoRA path never ran
    assert all(m.base_layer.weight.data_ptr() == ptr and torch.equal(m.base_layer.weight, w) for m, (ptr, w) in zip(layers, before))
    monkeypatch.setattr(adapters, "folded", lambda *_: contextlib.nullcontext())
    want_scores, _ = e.infer.next_token_probs("m0", prompts, "Score:", list("12345"))
    want_texts = e.infer.generate("m0", prompts, max_new_tokens=8)
    assert lora_calls  # the LoRA path this time
    assert scores == pytest.approx(want_scores, abs=1e-5) and texts == want_texts
    assert scores.std() > 0


def test_a_4bit_base_is_not_folded(engine):
    from minibt.engine.adapters import foldable

    assert foldable(engine.model, "m0") == []
