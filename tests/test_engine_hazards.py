"""The GPU path's hazards (issue 16), each pinned on the CPU where its mechanism exists here:
bf16 autocast, fp16 matmuls, bitsandbytes 4-bit serialization. GPU-only parts: tests/test_gpu.py and
bench/device-check.sh. The source lines behind each guard are in minibt/stack_guards.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from click.testing import CliRunner

from minibt import stack_guards
from minibt.engine import Engine
from minibt.errors import MinibtError
from minibt.recipe import LoraSection, ModelSection, TrainSection
from test_engine import pairs

STEPS = TrainSection(epochs=1, max_steps=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0)
CHOICES = list("12345")


def _load(model_dir: str, **model) -> Engine:
    return Engine.load(ModelSection(name=model_dir, max_length=128, **model), LoraSection(r=8, alpha=16), seed=0)


def _prompts(e: Engine, n: int = 6) -> list[str]:
    return [p["prompt"] + " north" * k for k, p in enumerate(pairs(e, n))]  # mixed lengths: left padding


# --- 1. accelerate's autocast wrapper does not outlive training -------------------------------

FRESH = """
import json, sys, torch
torch.set_num_threads(1)
from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection
model_dir, adapters, prompts, completions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
e = Engine.load(ModelSection(name=model_dir, max_length=128, dtype="bfloat16"), LoraSection(r=8, alpha=16), seed=0)
out = {}
for name in ("m0", "probe"):
    e.load_adapter(name, f"{adapters}/{name}")
    out[name] = [e.next_token_probs(name, prompts, "Score:", list("12345"))[0].tolist(),
                 e.completion_logprobs(name, prompts, completions).tolist()]
print("RESULT " + json.dumps(out))
"""


def test_bf16_training_leaves_no_autocast_wrapper_and_scores_as_a_fresh_process(tiny_model_dir, tmp_path):
    e = _load(tiny_model_dir, dtype="bfloat16")
    autocast: list[bool] = []
    hook = e.model.get_base_model().register_forward_pre_hook(lambda m, a: autocast.append(torch.is_autocast_enabled("cpu")))
    e.train("m0", pairs(e, 8), STEPS, tmp_path / "m0")
    assert autocast and all(autocast), "bf16 training runs under accelerate's autocast"
    assert "_original_forward" not in e.model.__dict__ and "forward" not in e.model.__dict__
    assert not hasattr(e.model, "_is_accelerate_prepared")

    # m0 is bf16 (trl casts trained QLoRA weights), "probe" fp32 as peft makes it (an adapter of an fp16 or
    # fp32 run looks so): autocast would run its LoRA matmuls in bf16, and its scores would move
    e.add_adapter("probe")
    with torch.no_grad():
        for n, p in e.model.named_parameters():
            if ".probe." in n and "lora_B" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    prompts = _prompts(e)
    completions = [p["completion"] for p in pairs(e, len(prompts))]
    autocast.clear()
    here = {name: [e.next_token_probs(name, prompts, "Score:", CHOICES)[0].tolist(),
                   e.completion_logprobs(name, prompts, completions).tolist()] for name in ("m0", "probe")}
    assert autocast and not any(autocast), "scoring after training runs as loaded, not under autocast"
    for name in here:
        e.save_adapter(name, tmp_path / "saved" / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", FRESH, tiny_model_dir, str(tmp_path / "saved"), json.dumps(prompts),
                           json.dumps(completions)], capture_output=True, text=True, timeout=240, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    assert here == json.loads(line[-1][len("RESULT "):])  # CPU, one thread: bit-identical

    autocast.clear()  # the next trainer wraps again (accelerate would skip a model marked prepared)
    e.train("m1", pairs(e, 8), STEPS, tmp_path / "m1")
    hook.remove()
    assert autocast and all(autocast)


# --- 2. no KV cache where none is reused -----------------------------------------------------


def test_scoring_and_log_likelihoods_build_no_kv_cache(engine_fp32):
    e = engine_fp32
    caches: list[object] = []
    hook = e.model.get_base_model().register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    e.prefix_cache = False  # a shared head's cache is reused by design; the rows' own are not
    try:
        e.next_token_probs("m0", _prompts(e), "Score:", CHOICES)
        e.completion_logprobs("m0", _prompts(e, 2), ["the king is red.", "the river"])
    finally:
        e.prefix_cache = True
        hook.remove()
    assert len(caches) == 2 and caches == [None, None]


# --- 3. the out-of-memory retry starts after the failed attempt is freed ----------------------


def test_training_retry_starts_after_the_failed_trainer_and_optimizer_are_freed(engine_fp32, tmp_path, monkeypatch):
    from trl import SFTTrainer

    e = engine_fp32
    failed: list[weakref.ref] = []
    alive_at_retry: list[list[bool]] = []
    training_step = SFTTrainer.training_step

    def out_of_memory_once(self, *args, **kwargs):
        if not failed:
            failed.extend([weakref.ref(self), weakref.ref(self.optimizer)])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return training_step(self, *args, **kwargs)

    train_once = Engine._train_once

    def spy(self, name, rows, cfg, *args, **kwargs):
        if failed:
            alive_at_retry.append([ref() is not None for ref in failed])
        return train_once(self, name, rows, cfg, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory_once)
    monkeypatch.setattr(Engine, "_train_once", spy)
    result = e.train("m3", pairs(e, 8), STEPS, tmp_path)
    assert alive_at_retry == [[False, False]], "the failed attempt's trainer/optimizer were still alive at the retry"
    assert result["steps"] == STEPS.max_steps
    e.delete_adapter("m3")


# --- 4. fully masked rows: fp16 batches, NaN guard ----------------------------------------------


def _naive_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_):
    """SDPA as CUDA's fp16 kernels behave on a row that sees no key: softmax over only -inf is NaN."""
    if enable_gqa and key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value


def test_left_padded_rows_stay_finite_under_a_kernel_that_gives_nan_for_fully_masked_rows(engine_fp32, monkeypatch):
    """The engine's sdpa mask leaves no row without a key; the stock mask does, and the check then fails loudly."""
    from transformers.integrations import sdpa_attention

    e = engine_fp32
    base = e.model.get_base_model()
    assert base.config._attn_implementation == stack_guards.SAFE_SDPA
    prompts = _prompts(e)
    monkeypatch.setattr(e, "prefix_cache", False)  # with a shared head cached, every row sees its keys
    want, _ = e.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", _naive_sdpa)
    got, _ = e.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    assert got == pytest.approx(want, abs=1e-5)
    base.set_attn_implementation("sdpa")  # transformers 5.17's own mask
    try:
        with pytest.raises(MinibtError, match=r"non-finite logits in scoring with adapter 'm0'"):
            e.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
        with pytest.raises(MinibtError, match=r"non-finite logits in decoding with adapter 'myx'"):
            e.generate("myx", prompts, max_new_tokens=2, batch_size=6)
    finally:
        base.set_attn_implementation(stack_guards.SAFE_SDPA)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_fp16_mixed_length_batches_are_finite_and_equal_one_by_one(tiny_model_dir, tmp_path, quantization):
    e = _load(tiny_model_dir, dtype="float16", quantization=quantization)
    e.train("m0", pairs(e, 8), STEPS, tmp_path)
    prompts = _prompts(e)
    logits: list[torch.Tensor] = []
    hook = e.model.get_base_model().register_forward_hook(lambda m, a, out: logits.append(out.logits))
    batch, _ = e.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    single = [e.next_token_probs("m0", [p], "Score:", CHOICES)[0][0] for p in prompts]
    texts = e.generate("m0", prompts, max_new_tokens=6, batch_size=6)
    one_by_one = [e.generate("m0", [p], max_new_tokens=6)[0] for p in prompts]
    hook.remove()
    assert all(t.dtype == torch.float16 or t.dtype == torch.float32 for t in logits)
    assert all(bool(torch.isfinite(t).all()) for t in logits), "every fp16 forward gave finite logits"
    assert batch == pytest.approx(torch.tensor(single).numpy(), abs=1e-2)  # fp16 kernels, different padding
    assert sum(a == b for a, b in zip(texts, one_by_one)) >= len(prompts) - 1  # greedy: at most one near-tie flips


# --- 5. a pre-quantized repo computes in the recipe's dtype ------------------------------------


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
    probs, _ = e.next_token_probs("base", _prompts(e, 2), "Score:", CHOICES)
    assert probs.shape == (2, 5)


def test_a_prequantized_repo_is_refused_where_minibt_cannot_honour_the_recipe(prequantized_dir, tmp_path):
    with pytest.raises(MinibtError, match="model.quantization: .* is pre-quantized"):
        _load(prequantized_dir, quantization="none")
    q = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    with pytest.raises(MinibtError, match="pre-quantized as bitsandbytes fp4"):
        stack_guards.check_prequantized("x", q, "nf4")
    with pytest.raises(MinibtError, match="pre-quantized as gptq"):
        stack_guards.check_prequantized("x", {"quant_method": "gptq", "bits": 4}, "nf4")


# --- 6. no silent CPU fallback -----------------------------------------------------------------


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


# --- the base's embeddings stay as loaded -----------------------------------------------------


def test_training_a_role_leaves_the_base_embeddings_byte_identical(engine_fp32, tmp_path, monkeypatch):
    e = engine_fp32
    base = e.model.get_base_model()
    before = [m.weight.detach().clone() for m in (base.get_input_embeddings(), base.get_output_embeddings())]
    e.train("m4", pairs(e, 8), STEPS, tmp_path / "a")
    after = [m.weight for m in (base.get_input_embeddings(), base.get_output_embeddings())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    e.delete_adapter("m4")

    # the tripwire: a trainer that writes into the shared embeddings (as fix_untrained_tokens would) is caught
    from trl import SFTTrainer

    train = SFTTrainer.train

    def edits_embeddings(self, *args, **kwargs):
        with torch.no_grad():
            base.get_input_embeddings().weight[5] = 0.0
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", edits_embeddings)
    try:
        with pytest.raises(RuntimeError, match="the base's embeddings changed while m5 trained"):
            e.train("m5", pairs(e, 8), STEPS, tmp_path / "b")
    finally:
        with torch.no_grad():
            base.get_input_embeddings().weight.copy_(before[0])
        e.delete_adapter("m5")


@pytest.fixture(scope="module")
def engine_fp32(tiny_model_dir, tmp_path_factory) -> Engine:
    e = _load(tiny_model_dir)
    work = tmp_path_factory.mktemp("hazards")
    for name in ("myx", "m0"):
        e.train(name, pairs(e, 8), STEPS, work / name)
    return e
