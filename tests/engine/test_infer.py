"""The HF inference engine (minibt/engine/infer.py): decoding, scoring, log-likelihoods, the prefix cache,
sampling streams, clipping, and the GPU path's inference hazards pinned on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minibt import prompts as prompt_text
from minibt import stack_guards
from minibt.engine import Engine
from minibt.errors import MinibtError
from minibt.recipe import LoraSection, ModelSection, TrainSection
from tiny_engine import pairs

CHOICES = list("12345")


def _prompts(e: Engine, n: int = 6) -> list[str]:
    return [p["prompt"] + " north" * k for k, p in enumerate(pairs(e, n))]  # mixed lengths: left padding


def test_scoring_a_batch_equals_scoring_one_by_one(engine):
    prompts = [p["prompt"] + "x" * k for k, p in enumerate(pairs(engine, 6))]  # different lengths: padding
    batch, mass = engine.infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    single = [engine.infer.next_token_probs("m0", [p], "Score:", CHOICES)[0][0] for p in prompts]
    assert batch == pytest.approx(torch.tensor(single).numpy(), abs=2e-3)
    assert batch.sum(axis=1) == pytest.approx(1.0)
    assert ((mass > 0) & (mass <= 1)).all()


def test_completion_logprobs_prefer_what_was_trained(engine):
    prompt = pairs(engine, 1)[0]["prompt"]
    good, bad = engine.infer.completion_logprobs("m0", [prompt, prompt], ["the king is red.", "south mountain the the"])
    assert good > bad
    assert good > engine.infer.completion_logprobs("base", [prompt], ["the king is red."])[0]  # m0 learned it


def test_compacting_decode_matches_generate_greedily(engine):
    """The engine's own decode loop drops finished rows; greedy outputs must equal HF generate's."""
    prompts = [p["prompt"] + "x" * k for k, p in enumerate(pairs(engine, 8))]
    ours = engine.infer.generate("m0", prompts, max_new_tokens=10, batch_size=8)
    encoded = engine.text.encode(prompts, room=10)
    with engine.use("m0"), torch.no_grad():
        ids, mask = engine.infer.left_pad(encoded)
        out = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id)
    theirs = [engine.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
    assert ours == theirs


def test_sampling_follows_the_calls_seed_whatever_ran_before(engine):
    """Each batch samples from its own generator (sampling.batch_seed): the same seed gives the same texts
    after other sampling, another seed other texts, and torch's global generator is left alone."""
    prompts = _prompts(engine, 6)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=2)
    first = engine.infer.generate("myx", prompts, seed=5, **kwargs)
    engine.infer.generate("myx", prompts, seed=6, **kwargs)
    untouched = torch.manual_seed(99).get_state()
    assert engine.infer.generate("myx", prompts, seed=5, **kwargs) == first
    assert torch.equal(torch.random.get_rng_state(), untouched)
    assert engine.infer.generate("myx", prompts, seed=6, **kwargs) != first


def test_clip_says_whether_it_cut(engine):
    before = engine.text.truncated
    long = " ".join(["the king is red"] * 20)
    text, cut = engine.text.clip(long, 10)
    assert cut and engine.text.count_tokens(text) <= 10 and long.startswith(text)
    assert engine.text.clip("the king", 10) == ("the king", False)
    assert engine.text.clip_text(long, 10) == text
    assert engine.text.truncated == before + 2  # the two cuts, counted over the engine's life


# --- out of memory: halve the batch and retry --------------------------------------------------


def _oom_above(limit: int, calls: list[int]):
    def forward_hook(module, args, kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        calls.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    return forward_hook


def test_inference_halves_the_batch_on_out_of_memory(engine):
    infer = engine.infer.variant(max_pad_share=1.0)  # each batch one forward, as on a GPU
    prompts = [p["prompt"] for p in pairs(engine, 8)]
    want, _ = infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=8)
    calls: list[int] = []
    handle = engine.model.get_base_model().register_forward_pre_hook(_oom_above(2, calls), with_kwargs=True)
    try:
        got, _ = infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=8)
        texts = infer.generate("m0", prompts[:3], max_new_tokens=2, batch_size=8)
    finally:
        handle.remove()
    batches = calls[1:] if calls[0] == 1 else calls  # [1]: the shared-prefix pass (the prefix cache)
    assert batches[:3] == [8, 4, 2] and got == pytest.approx(want, abs=2e-3)
    assert len(texts) == 3


# --- the prefix cache: a head shared by every prompt, computed once ----------------------------


def test_prefix_cache_scores_exactly_like_full_prompts(random_lora_engine):
    e = random_lora_engine
    head = "tell me about the north and the south and the large old city of the king. " * 3
    texts = [e.text.render([{"role": "user", "content": head + tail}])
             for tail in ("red", "the blue river", "a", "what is the color of the small queen", "five")]
    full, full_mass = e.infer.variant(prefix_cache=False).next_token_probs("rater", texts, "Score:", CHOICES, batch_size=2)
    cached, cached_mass = e.infer.next_token_probs("rater", texts, "Score:", CHOICES, batch_size=2)
    assert np.allclose(full, cached, atol=1e-5) and np.allclose(full_mass, cached_mass, atol=1e-5)


def test_prefix_cache_generates_exactly_like_full_prompts(random_lora_engine):
    """Generation computes the prompts' shared head once (the bench's fast side): same texts, sampled
    or greedy, as running every prompt whole; and the head is really shared here."""
    e = random_lora_engine
    head = "write the instruction that the following text is the answer to, in the north and the south. "
    texts = [e.text.render([{"role": "user", "content": head + tail}])
             for tail in ("the king is red.", "a", "the small old river is blue and the city is new.", "five")]
    with e.use("myx"):
        assert e.infer.shared_head(e.tokenizer(texts)["input_ids"])[0] >= 16
    outputs = {}
    for cached in (False, True):
        infer = e.infer.variant(prefix_cache=cached)
        outputs[cached] = [infer.generate("myx", texts, max_new_tokens=8, temperature=t, top_p=0.9, batch_size=3, seed=1)
                           for t in (0.0, 0.9)]
    assert outputs[True] == outputs[False]


# --- forwards split by length on a CPU: padding is computed work there ----------------------------


@pytest.mark.parametrize("head", ["", "write the instruction that the following text is the answer to, in the north and the south. "])
def test_rows_split_by_length_give_what_the_whole_batch_gives(random_lora_engine, head):
    """Prefill in groups of similar length (each its own forward, the caches joined for decoding), with
    and without a shared head: the texts, scores and log-likelihoods of one padded forward per batch."""
    e = random_lora_engine
    tails = ("the king is red.", "a", "the small old river is blue and the city is new " * 4, "five small kings", "the north " * 9)
    texts = [e.text.render([{"role": "user", "content": head + tail}]) for tail in tails]
    split, whole = e.infer.variant(max_pad_share=0.0), e.infer.variant(max_pad_share=1.0)
    ids, mask = e.infer.left_pad(e.tokenizer(texts)["input_ids"])
    lengths = mask.sum(-1).tolist()
    assert len(split.groups(lengths)) == len(tails) and len(whole.groups(lengths)) == 1
    for t in (0.0, 0.9):
        kwargs = dict(max_new_tokens=8, temperature=t, top_p=0.9, batch_size=5, seed=1)
        assert split.generate("myx", texts, **kwargs) == whole.generate("myx", texts, **kwargs)
    got, _ = split.next_token_probs("rater", texts, "Score:", CHOICES)
    want, _ = whole.next_token_probs("rater", texts, "Score:", CHOICES)
    assert np.allclose(got, want, atol=1e-5)
    completions = ["the king is red."] * len(texts)
    assert np.allclose(split.completion_logprobs("rater", texts, completions),
                       whole.completion_logprobs("rater", texts, completions), atol=1e-5)


# --- no KV cache where none is reused ----------------------------------------------------------


def test_scoring_and_log_likelihoods_build_no_kv_cache(engine):
    caches: list[object] = []
    hook = engine.model.get_base_model().register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    infer = engine.infer.variant(prefix_cache=False)  # a shared head's cache is reused by design; the rows' own are not
    try:
        infer.next_token_probs("m0", _prompts(engine), "Score:", CHOICES)
        infer.completion_logprobs("m0", _prompts(engine, 2), ["the king is red.", "the river"])
    finally:
        hook.remove()
    assert len(caches) >= 2 and all(cache is None for cache in caches)  # a forward per group of similar length


# --- fully masked rows: fp16 batches, NaN guard --------------------------------------------------


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


def test_left_padded_rows_stay_finite_under_a_kernel_that_gives_nan_for_fully_masked_rows(engine, monkeypatch):
    """The engine's sdpa mask leaves no row without a key; the stock mask does, and the check then fails loudly."""
    from transformers.integrations import sdpa_attention

    base = engine.model.get_base_model()
    assert base.config._attn_implementation == stack_guards.SAFE_SDPA
    prompts = _prompts(engine)
    infer = engine.infer.variant(prefix_cache=False)  # with a shared head cached, every row sees its keys
    want, _ = infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", _naive_sdpa)
    got, _ = infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    assert got == pytest.approx(want, abs=1e-5)
    base.set_attn_implementation("sdpa")  # transformers 5.17's own mask
    try:
        with pytest.raises(MinibtError, match=r"non-finite logits in scoring with adapter 'm0'"):
            infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
        with pytest.raises(MinibtError, match=r"non-finite logits in decoding with adapter 'myx'"):
            infer.generate("myx", prompts, max_new_tokens=2, batch_size=6)
    finally:
        base.set_attn_implementation(stack_guards.SAFE_SDPA)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_fp16_mixed_length_batches_are_finite_and_equal_one_by_one(tiny_model_dir, tmp_path, quantization):
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=128, dtype="float16", quantization=quantization),
                    LoraSection(r=8, alpha=16), seed=0)
    e.train("m0", pairs(e, 8), TrainSection(epochs=1, max_steps=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0),
            tmp_path)
    prompts = _prompts(e)
    logits: list[torch.Tensor] = []
    hook = e.model.get_base_model().register_forward_hook(lambda m, a, out: logits.append(out.logits))
    batch, _ = e.infer.next_token_probs("m0", prompts, "Score:", CHOICES, batch_size=6)
    single = [e.infer.next_token_probs("m0", [p], "Score:", CHOICES)[0][0] for p in prompts]
    texts = e.infer.generate("m0", prompts, max_new_tokens=6, batch_size=6)
    one_by_one = [e.infer.generate("m0", [p], max_new_tokens=6)[0] for p in prompts]
    hook.remove()
    assert all(t.dtype == torch.float16 or t.dtype == torch.float32 for t in logits)
    assert all(bool(torch.isfinite(t).all()) for t in logits), "every fp16 forward gave finite logits"
    assert batch == pytest.approx(torch.tensor(single).numpy(), abs=1e-2)  # fp16 kernels, different padding
    assert sum(a == b for a, b in zip(texts, one_by_one)) >= len(prompts) - 1  # greedy: at most one near-tie flips


def test_a_choice_that_is_not_one_token_is_refused(engine):
    with pytest.raises(MinibtError, match="does not write score"):
        engine.text.choice_ids(prompt_text.SCORE_PREFIX, ["12345", "1"])
