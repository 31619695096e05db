"""The memory estimate: shapes and per-stage bytes against numbers computed by hand; nothing is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import minibt.memory as memory
from minibt.memory import GiB, estimate, format_estimate, known_shape, shape_from_config
from minibt.recipe import load_recipe

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """No test here touches the network: a hub download fails as it does offline."""

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr(memory, "_download_config", offline)


def recipe(tmp_path: Path, model: str, overrides: list[str] = ()):
    (tmp_path / "seed.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "corpus.jsonl").write_text('{"text": "c"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{name: {model}, dtype: float16, max_length: 1024}}\n"
        "seed: {path: seed.jsonl}\ncorpus: {path: corpus.jsonl}\n"
        "backward: {batch_size: 4}\nforward: {batch_size: 4}\naugment: {batch_size: 32}\ncurate: {batch_size: 16}\n"
    )
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize("name, params", [
    # the published parameter counts of these bases
    ("unsloth/Llama-3.2-1B-bnb-4bit", 1_235_814_400),
    ("meta-llama/Llama-3.2-3B", 3_212_749_824),
    ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", 8_030_261_248),
    ("unsloth/Qwen2.5-0.5B-bnb-4bit", 494_032_768),
    ("unsloth/Qwen2.5-1.5B-bnb-4bit", 1_543_714_304),
    ("Qwen/Qwen2.5-3B", 3_085_938_688),
    ("Qwen/Qwen2.5-7B", 7_615_616_512),
    ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
])
def test_known_shapes_have_the_published_parameter_counts(name, params):
    assert known_shape(name)[1].params() == params


def test_name_patterns_do_not_confuse_sizes():
    assert known_shape("unsloth/Llama-3.2-11B-Vision") is None
    assert known_shape("Qwen/Qwen2.5-1.5B")[0] == "Qwen2.5-1.5B"
    assert known_shape("Qwen/Qwen2.5-0.5B")[0] == "Qwen2.5-0.5B"
    assert known_shape("some-org/unknown-model") is None


def test_llama_3_2_1b_by_hand(tmp_path, monkeypatch):
    """Every part of two stages, computed by hand for Llama-3.2-1B (fp16, batch 4 x 1024 tokens)."""
    monkeypatch.setattr(memory, "load_config", lambda *a: None)  # offline, even with a warm HF cache
    est = estimate(recipe(tmp_path, "unsloth/Llama-3.2-1B-bnb-4bit"))
    assert "estimated from a known shape (Llama-3.2-1B" in est.source
    # vocab 128256, hidden 2048, MLP 8192, 16 layers, 32 heads, 8 KV heads of 64, tied embeddings
    # per layer: q 2048*2048 + k,v 2048*512 each + o 2048*2048 + gate, up, down 2048*8192 each = 60,817,408
    linear = 16 * 60_817_408  # 973,078,528 4-bit parameters
    assert est.shape.linear_params() == linear == 973_078_528
    # 4-bit: 0.5 byte + 1/64 (8-bit absmax per 64) + 1/4096 (fp32 per 256 absmaxes) per parameter
    nf4 = 486_539_264 + 15_204_352 + 237_568
    embed = 128256 * 2048 * 2 + (2 * 16 + 1) * 2048 * 2  # embeddings and norms in fp16
    weights = nf4 + embed
    assert weights == 1_027_452_928
    # LoRA r=16 on all 7 projections: 16 * (in + out) summed = 704,512 per layer
    lora = 16 * 704_512
    assert est.lora_params == lora == 11_272_192

    stages = {s.stage: s for s in est.stages}
    assert list(stages) == ["backward", "augment", "m0", "curate_r1", "m1"]  # prepare runs on the CPU

    tokens = 4 * 1024
    backward = stages["backward"].parts
    assert backward == {
        "weights": weights,
        "lora": lora * 16,  # myx: fp32 weights + gradient + Adam's two moments
        # gradient checkpointing: each layer's input (16 x tokens x 2048) + one layer recomputed:
        # 4h + 3q + 3kv + 4i = 8192 + 6144 + 1536 + 32768 = 48,640 values per token, 2 bytes each
        "activations": 16 * tokens * 2048 * 2 + tokens * 48_640 * 2,
        "logits": tokens * 128256 * 10,  # fp16 logits + fp32 copy + fp32 log-softmax
        "kv_cache": 0,
        "overhead": GiB // 2,
    }
    assert stages["backward"].total == 7_664_939_008  # 7.14 GiB

    augment = stages["augment"].parts
    assert augment == {
        "weights": weights,
        "lora": lora * 4,  # myx, fp32
        "activations": 32 * 1024 * (2 * 2048 + 3 * 8192) * 2,  # one layer of the prefill: 1.75 GiB
        "logits": 32 * 128256 * 6,  # the last position only: fp16 + fp32
        "kv_cache": 2 * 16 * 512 * 32 * 1024 * 2,  # k and v, 16 layers, 8 x 64 wide: 1 GiB
        "overhead": GiB // 2,
    }
    assert stages["curate_r1"].parts == {  # rubric digits: one forward pass, last position's logits
        "weights": weights,
        "lora": lora * 2 * 4,  # myx, m0
        "activations": 16 * 1024 * (2 * 2048 + 3 * 8192) * 2,
        "logits": 16 * 128256 * 6,
        "kv_cache": 2 * 16 * 512 * 16 * 1024 * 2,
        "overhead": GiB // 2,
    }
    assert stages["m1"].parts["lora"] == lora * (3 * 4 + 12)  # myx, m0 resident; m1 training
    assert stages["m1"].total == 7_664_939_008 + 8 * lora == 7_755_116_544  # 7.22 GiB
    assert est.peak.stage == "m1"


def test_without_gradient_checkpointing_every_layer_keeps_its_activations(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "load_config", lambda *a: None)
    r = recipe(tmp_path, "unsloth/Llama-3.2-1B-bnb-4bit", ["backward.gradient_checkpointing=false"])
    parts = estimate(r).stages[0].parts
    assert parts["activations"] == 16 * 4 * 1024 * 48_640 * 2  # 5.94 GiB


def test_quantization_none_and_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "load_config", lambda *a: None)
    r = recipe(tmp_path, "unsloth/Llama-3.2-1B-bnb-4bit", ["model.quantization=none", "model.dtype=float32"])
    assert estimate(r).stages[0].parts["weights"] == 1_235_814_400 * 4


def test_shape_from_a_local_config_folder(tmp_path):
    """A local model folder: its config.json, with the defaults of its transformers config class."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
    }))
    est = estimate(recipe(tmp_path, str(folder)))
    assert est.source == "from the model config"
    assert est.shape.params() == 1_543_714_304  # Qwen2.5-1.5B, q/k/v biases included


def test_shape_from_a_downloaded_config(tmp_path, monkeypatch):
    import huggingface_hub.constants

    got = []
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(memory, "_download_config", lambda name, rev: got.append(name) or {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4})
    est = estimate(recipe(tmp_path, "some-org/not-cached-anywhere"))
    assert got == ["some-org/not-cached-anywhere"] and est.source == "from the model config"
    assert est.shape.kv_heads == 4 and est.shape.head_dim == 16 and not est.shape.tied  # LlamaConfig defaults


def test_unknown_model_offline_is_unavailable_not_guessed(tmp_path):
    est = estimate(recipe(tmp_path, "some-org/unknown-model"))
    assert est.shape is None and not est.stages
    text = format_estimate(est)
    assert text.startswith("memory estimate: unavailable for some-org/unknown-model")
    assert "matches no known shape" in text


def test_mixture_of_experts_is_not_estimated():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        shape_from_config({"num_local_experts": 8, "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1,
                           "num_hidden_layers": 1, "num_attention_heads": 1})


def test_format_labels_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "load_config", lambda *a: None)
    text = format_estimate(estimate(recipe(tmp_path, "unsloth/Llama-3.2-1B-bnb-4bit")))
    assert "an estimate" in text and "not a measurement" in text
    assert "1.24B parameters" in text and "11.3M parameters per adapter" in text
    assert "max: 7.22 GiB (estimated), in m1" in text  # 7,755,116,544 bytes
