"""Loading a base (minibt/engine/load.py): 4-bit NF4 once, the bitsandbytes CPU trap guarded, pre-quantized
repos, no silent CPU fallback, and the one loader behind the judge."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from minibt import stack_guards
from minibt.engine import Engine, load
from minibt.errors import MinibtError
from minibt.recipe import LoraSection, ModelSection
from tiny_engine import lora_grads_vs_dequantized_reference, pairs

CHOICES = list("12345")


def _load(model_dir: str, **model) -> Engine:
    return Engine.load(ModelSection(name=model_dir, max_length=128, **model), LoraSection(r=8, alpha=16), seed=0)


def test_base_is_4bit_and_loaded_once(engine):
    import bitsandbytes as bnb

    quantized = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the base should be NF4-quantized"
    assert all(not m.support_avx512bf16_for_cpu for m in quantized), "the CPU repacking guard is off"
    assert engine.base_loads == 1
    assert engine.adapters == ["myx", "m0"]


def test_a_judge_loads_through_the_same_loader_with_no_adapters(tiny_model_dir, monkeypatch):
    import bitsandbytes as bnb

    from minibt.pairwise import load_judge

    seen = []
    real = load.load_weights
    monkeypatch.setattr(load, "load_weights", lambda cfg, *a, **k: seen.append(cfg.name) or real(cfg, *a, **k))
    judge = load_judge(tiny_model_dir, "nf4")
    assert seen == [tiny_model_dir] and not hasattr(judge.model, "get_base_model"), "a plain model, no peft"
    assert judge.adapters == [] and judge.model_cfg.max_length == 512  # the tiny Llama's max_position_embeddings
    layers = [m for m in judge.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    probs, _ = judge.next_token_probs("base", [p["prompt"] for p in pairs(judge, 3)], "Score:", CHOICES)
    assert probs.shape == (3, 5)
    with pytest.raises(MinibtError, match="has no adapters"):
        judge.generate("m0", ["x"], max_new_tokens=1)


def test_a_local_base_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MinibtError, match="has no .safetensors weights"):
        load.load_base(ModelSection(name=str(tmp_path)))


# --- the bitsandbytes CPU gradient trap ----------------------------------------------------


def test_lora_gradients_are_right_after_inference_on_cpu_4bit(tiny_model_dir):
    """Fails without load.guard_bnb_cpu: bitsandbytes repacks weights on the first eval forward."""
    assert lora_grads_vs_dequantized_reference(tiny_model_dir) < 1e-3


def test_the_trap_is_real_without_the_guard(tiny_model_dir, monkeypatch):
    """Shows the test above can fail: with the guard off, gradients go wrong on AVX512-BF16 CPUs."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks and the trap cannot spring")
    monkeypatch.setattr(load, "guard_bnb_cpu", lambda model: 0)
    assert lora_grads_vs_dequantized_reference(tiny_model_dir) > 0.05


# --- a pre-quantized repo computes in the recipe's dtype ---------------------------------------


@pytest.fixture(scope="module")
def prequantized_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny Llama loaded in NF4 with bf16 compute (as unsloth's -bnb-4bit repos are) and saved so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("tiny-bnb-4bit")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32, device_map="cpu")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_a_prequantized_repo_computes_in_the_recipes_dtype(prequantized_dir):
    import bitsandbytes as bnb

    saved = json.loads(open(os.path.join(prequantized_dir, "config.json")).read())["quantization_config"]
    assert saved["bnb_4bit_compute_dtype"] == "bfloat16" and saved["quant_method"] == "bitsandbytes"
    e = _load(prequantized_dir, dtype="float32")
    layers = [m for m in e.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.float32}
    assert e.model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    probs, _ = e.infer.next_token_probs("base", [p["prompt"] for p in pairs(e, 2)], "Score:", CHOICES)
    assert probs.shape == (2, 5)


def test_a_prequantized_repo_is_refused_where_minibt_cannot_honour_the_recipe(prequantized_dir, tmp_path):
    with pytest.raises(MinibtError, match="model.quantization: .* is pre-quantized"):
        _load(prequantized_dir, quantization="none")
    q = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    with pytest.raises(MinibtError, match="pre-quantized as bitsandbytes fp4"):
        stack_guards.check_prequantized("x", q, "nf4")
    with pytest.raises(MinibtError, match="pre-quantized as gptq"):
        stack_guards.check_prequantized("x", {"quant_method": "gptq", "bits": 4}, "nf4")


# --- no silent CPU fallback --------------------------------------------------------------------


def test_a_real_recipe_without_cuda_stops_unless_it_says_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MinibtError, match="model.device: torch .* sees no CUDA GPU"):
        stack_guards.require_device("auto", toy=False)
    stack_guards.require_device("cpu", toy=False)
    stack_guards.require_device("auto", toy=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MinibtError, match="model.device: cpu, but a CUDA GPU is visible"):
        stack_guards.require_device("cpu", toy=False)
    stack_guards.require_device("auto", toy=False)


def test_minibt_run_stops_before_loading_anything(tmp_path):
    from minibt.cli import main

    (tmp_path / "r.yaml").write_text("model: {name: some-org/a-1b-base}\nseed: {dataset: x/y}\ncorpus: {dataset: x/z}\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error: model.device: torch" in result.output and "set model.device=cpu" in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    """A ChatML tokenizer as transformers' GGUF conversion leaves it: eos <|im_start|>, turns end with <|im_end|>."""
    from transformers import AutoTokenizer

    from minibt.gguf import converted_folder
    from tiny_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("chatml")
    write_tiny_gguf(root / "tiny.gguf")
    return lambda: AutoTokenizer.from_pretrained(converted_folder(root / "tiny.gguf", cache=root))


def test_eos_becomes_the_templates_end_of_turn(chatml_tokenizer):
    tokenizer = chatml_tokenizer()
    tokenizer.eos_token = "<|im_start|>"
    load.set_chat_template(tokenizer, ModelSection(name="x"))
    assert tokenizer.eos_token == "<|im_end|>"
    # training appends EOS to each output (trl): it is the token generation stops on
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False)
    assert turn.split("ANSWER", 1)[1].startswith(tokenizer.eos_token)


def test_minibt_template_and_plain_text_turn_ends_keep_the_tokenizers_eos(chatml_tokenizer):
    tokenizer = chatml_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    load.set_chat_template(tokenizer, ModelSection(name="x", chat_template="minibt"))  # its turns end with eos_token
    assert tokenizer.eos_token == "<|endoftext|>"
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert load.end_of_turn(tokenizer) is None
    load.set_chat_template(tokenizer, ModelSection(name="x"))
    assert tokenizer.eos_token == "<|endoftext|>"
