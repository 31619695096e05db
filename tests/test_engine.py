"""The engine on a tiny 4-bit Llama (bitsandbytes NF4 on CPU): roles, isolation, reloads, scoring."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minibt import engine as engine_mod
from minibt.engine import Engine
from minibt.errors import MinibtError
from minibt.recipe import LoraSection, ModelSection, TrainSection

STEPS = TrainSection(epochs=1, max_steps=12, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0)


def pairs(engine: Engine, n: int = 16) -> list[dict[str, str]]:
    words = ["king", "queen", "river", "city", "mountain", "north", "south", "color"]
    return [
        {"prompt": engine.render([{"role": "user", "content": f"what is the {w}"}]), "completion": f"the {w} is red."}
        for w in (words * 4)[:n]
    ]


def lora_state(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.named_parameters() if engine_mod._adapter_of(k) == name}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory) -> Engine:
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=128), LoraSection(r=8, alpha=16), seed=0)
    work = tmp_path_factory.mktemp("work")
    for name in ("myx", "m0"):
        e.train(name, pairs(e), STEPS, work / name)
    return e


def test_base_is_4bit_and_loaded_once(engine):
    import bitsandbytes as bnb

    quantized = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the base should be NF4-quantized"
    assert all(not m.support_avx512bf16_for_cpu for m in quantized), "the CPU repacking guard is off"
    assert engine.base_loads == 1
    assert engine.adapters == ["myx", "m0"]


def test_training_one_role_leaves_the_others_bit_identical(engine, tmp_path):
    before = {name: lora_state(engine, name) for name in ("myx", "m0")}
    base_before = {k: v.clone() for k, v in engine.model.state_dict().items() if "lora_" not in k}
    engine.train("m1", pairs(engine, 8), STEPS, tmp_path)
    for name, state in before.items():
        after = lora_state(engine, name)
        assert all(torch.equal(state[k], after[k]) for k in state), f"{name} changed while m1 trained"
    base_after = {k: v for k, v in engine.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "the base changed"
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in lora_state(engine, "m1").values())
    engine.delete_adapter("m1")


def test_only_the_active_role_is_trainable_after_switches(engine):
    for name in ("m0", "myx", "m0"):
        with engine.use(name, trainable=True):
            engine.check_trainable(name)
            assert all(p.requires_grad == (engine_mod._adapter_of(n) == name) for n, p in engine.model.named_parameters())
        with engine.use(name):
            engine.check_trainable(None)


def test_generation_with_an_adapter_differs_from_the_base(engine):
    prompt = [pairs(engine, 1)[0]["prompt"]]
    with_adapter = engine.generate("m0", prompt, max_new_tokens=6)
    base = engine.generate("base", prompt, max_new_tokens=6)
    assert with_adapter != base


def test_adapters_reload_from_disk_with_the_same_scores(engine, tmp_path):
    prompts = [p["prompt"] for p in pairs(engine, 4)]
    before, _ = engine.next_token_probs("m0", prompts, "Score:", list("12345"))
    engine.save_adapter("m0", tmp_path / "m0")
    assert (tmp_path / "m0" / "adapter_model.safetensors").exists()
    assert (tmp_path / "m0" / "chat_template.jinja").exists() or "chat_template" in (tmp_path / "m0" / "tokenizer_config.json").read_text()
    engine.load_adapter("m0_again", tmp_path / "m0")
    after, _ = engine.next_token_probs("m0_again", prompts, "Score:", list("12345"))
    assert after == pytest.approx(before, abs=1e-6)
    engine.delete_adapter("m0_again")


def test_scoring_a_batch_equals_scoring_one_by_one(engine):
    prompts = [p["prompt"] + "x" * k for k, p in enumerate(pairs(engine, 6))]  # different lengths: padding
    batch, mass = engine.next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=6)
    single = [engine.next_token_probs("m0", [p], "Score:", list("12345"))[0][0] for p in prompts]
    assert batch == pytest.approx(torch.tensor(single).numpy(), abs=2e-3)
    assert batch.sum(axis=1) == pytest.approx(1.0)
    assert ((mass > 0) & (mass <= 1)).all()


def test_completion_logprobs_prefer_what_was_trained(engine):
    prompt = pairs(engine, 1)[0]["prompt"]
    good, bad = engine.completion_logprobs("m0", [prompt, prompt], ["the king is red.", "south mountain the the"])
    assert good > bad
    assert good > engine.completion_logprobs("base", [prompt], ["the king is red."])[0]  # m0 learned it


def test_adapter_names_are_checked(engine):
    with pytest.raises(MinibtError, match="reserved"):
        engine.add_adapter("forward")  # collides with nn.Module.forward inside peft
    with pytest.raises(MinibtError, match="does not exist"):
        engine.generate("m7", ["x"], max_new_tokens=1)


# --- the bitsandbytes CPU gradient trap (STACK-NOTES) ----------------------------------------


def _lora_grads_vs_dequantized_reference(model_dir: str, backend: str = "auto", dtype: str = "auto") -> float:
    """Largest relative error of 4-bit LoRA gradients, after an inference pass, vs an fp32 reference.

    The reference is the same network with each NF4 weight dequantized into plain fp32 Linear layers
    BEFORE any inference, and the same LoRA weights, on the engine's device (each model gets its own
    copy of the batch). Tolerances are the caller's: 1e-3 holds for fp32 compute, not for bf16/fp16.
    """
    import bitsandbytes as bnb
    from peft import get_peft_model, set_peft_model_state_dict, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    e = Engine.load(ModelSection(name=model_dir, backend=backend, max_length=128, dtype=dtype), LoraSection(r=8, alpha=16), seed=0)
    e.add_adapter("m0")
    for n, p in e.model.named_parameters():  # non-zero B, so every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    dequantized = {
        name.replace(".base_layer", ""): bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in e.model.get_base_model().named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(e.device)
    for name, m in ref.named_modules():
        if name in dequantized:
            m.weight.data.copy_(dequantized.pop(name))
    assert not dequantized, "every NF4 layer has a reference"
    ref = get_peft_model(ref, engine_mod._lora_config(e.lora), adapter_name="m0")
    set_peft_model_state_dict(ref, get_peft_model_state_dict(e.model, adapter_name="m0"), adapter_name="m0")

    batch = e.tokenizer(["the king is red and the river is blue."], return_tensors="pt")
    e.generate("m0", ["the king"], max_new_tokens=2)  # an eval no-grad forward: the trap springs here

    def grads(model) -> dict[str, torch.Tensor]:
        model.zero_grad()
        inputs = {k: v.to(e.device) for k, v in batch.items()}
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with e.use("m0", trainable=True):
        got = grads(e.model)
    ref.train()
    want = grads(ref)
    assert set(got) == set(want) and got
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


def test_lora_gradients_are_right_after_inference_on_cpu_4bit(tiny_model_dir):
    """Fails without engine.guard_bnb_cpu: bitsandbytes repacks weights on the first eval forward."""
    assert _lora_grads_vs_dequantized_reference(tiny_model_dir) < 1e-3


def test_the_trap_is_real_without_the_guard(tiny_model_dir, monkeypatch):
    """Shows the test above can fail: with the guard off, gradients go wrong on AVX512-BF16 CPUs."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks and the trap cannot spring")
    monkeypatch.setattr(engine_mod, "guard_bnb_cpu", lambda model: 0)
    assert _lora_grads_vs_dequantized_reference(tiny_model_dir) > 0.05


# --- out of memory: halve the batch and retry, never lose the work ---------------------------


def _oom_above(limit: int, calls: list[int]):
    def forward_hook(module, args, kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        calls.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    return forward_hook


def test_inference_halves_the_batch_on_out_of_memory(engine):
    prompts = [p["prompt"] for p in pairs(engine, 8)]
    want, _ = engine.next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=8)
    calls: list[int] = []
    handle = engine.model.get_base_model().register_forward_pre_hook(_oom_above(2, calls), with_kwargs=True)
    try:
        got, _ = engine.next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=8)
        texts = engine.generate("m0", prompts[:3], max_new_tokens=2, batch_size=8)
    finally:
        handle.remove()
    batches = calls[1:] if calls[0] == 1 else calls  # [1]: the shared-prefix pass (engine.prefix_cache)
    assert batches[:3] == [8, 4, 2] and got == pytest.approx(want, abs=2e-3)
    assert len(texts) == 3


def test_training_retries_out_of_memory_with_the_same_effective_batch(engine, tmp_path):
    calls: list[int] = []
    handle = engine.model.get_base_model().register_forward_pre_hook(_oom_above(4, calls), with_kwargs=True)
    try:
        result = engine.train("m3", pairs(engine, 8), STEPS, tmp_path)
    finally:
        handle.remove()
    assert calls[0] == 8 and max(calls[1:]) <= 4 and result["steps"] > 0
    engine.delete_adapter("m3")


def test_compacting_decode_matches_generate_greedily(engine):
    """The engine's own decode loop drops finished rows; greedy outputs must equal HF generate's."""
    prompts = [p["prompt"] + "x" * k for k, p in enumerate(pairs(engine, 8))]
    ours = engine.generate("m0", prompts, max_new_tokens=10, batch_size=8)
    encoded = engine._encode(prompts, room=10)
    with engine.use("m0"), torch.no_grad():
        ids, mask = engine._left_pad(encoded)
        out = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id)
    theirs = [engine.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
    assert ours == theirs


def test_sampling_is_seeded_and_respects_top_p():
    from minibt.engine import _pick

    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]] * 200)
    torch.manual_seed(0)
    picked = _pick(logits, temperature=1.0, top_p=0.5)
    assert set(picked.tolist()) == {0}  # token 0 alone holds > 50 % of the mass
    torch.manual_seed(0)
    wide = _pick(logits, temperature=1.0, top_p=1.0)
    assert set(wide.tolist()) <= {0, 1} and 1 in wide.tolist()
    torch.manual_seed(0)
    assert torch.equal(_pick(logits, temperature=1.0, top_p=1.0), wide)


def test_nucleus_sampling_draws_exactly_what_a_full_sort_does(monkeypatch):
    """Peaked rows take their nucleus from the top-k candidates, a flat row (its nucleus reaching past
    them) makes the batch sort the whole vocabulary: either way, under one seed, the very tokens that
    sorting the whole vocabulary and calling torch.multinomial draw."""
    from minibt import engine as engine_module

    def full_sort(logits, temperature, top_p):
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p] = 0
        return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)

    monkeypatch.setattr(engine_module, "_NUCLEUS_CANDIDATES", 8)
    peaked = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) * 4
    for logits in (peaked, torch.cat([peaked, torch.zeros(1, 40)])):
        for top_p in (0.5, 0.9, 1.0):
            torch.manual_seed(1)
            ours = engine_module._pick(logits, 0.7, top_p)
            torch.manual_seed(1)
            assert torch.equal(ours, full_sort(logits, 0.7, top_p))


# --- checkpoints inside a training stage: a killed training resumes where it was --------------

RESUMABLE = TrainSection(epochs=1, max_steps=10, batch_size=4, learning_rate=5e-3, warmup_ratio=0.1, save_steps=3)


class Killed(Exception):
    """Stands for SIGKILL / a lost Colab runtime in the middle of training."""


def _forwards(fail_at: int | None = None, calls: list[int] | None = None, oom_above: int | None = None):
    """A forward pre-hook counting forward passes (their batch sizes); it raises Killed on pass `fail_at`."""
    calls = [] if calls is None else calls

    def hook(module, args, kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if oom_above is not None and n > oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        calls.append(n)
        if fail_at is not None and len(calls) == fail_at:
            raise Killed

    return hook


def _train_counting(engine: Engine, name: str, rows, cfg, work, **hook_kwargs) -> tuple[dict | None, list[int]]:
    calls: list[int] = []
    handle = engine.model.get_base_model().register_forward_pre_hook(_forwards(calls=calls, **hook_kwargs), with_kwargs=True)
    try:
        return engine.train(name, rows, cfg, work), calls
    except Killed:
        engine.delete_adapter(name)  # as pipeline.adapter_stage does with a half-trained adapter
        return None, calls
    finally:
        handle.remove()


def test_a_killed_training_resumes_from_its_checkpoint_to_the_same_adapter(engine, tmp_path, caplog):
    from safetensors import safe_open

    rows = pairs(engine, 20)  # 5 optimizer steps an epoch: the checkpoint at step 6 sits inside the 2nd epoch
    want, calls = _train_counting(engine, "m2", rows, RESUMABLE, tmp_path / "reference")
    assert len(calls) == 10 and sorted(p.name for p in (tmp_path / "reference").glob("checkpoint-*")) == ["checkpoint-9"]
    want_weights = lora_state(engine, "m2")
    engine.delete_adapter("m2")
    others = {name: lora_state(engine, name) for name in ("myx", "m0")}

    work = tmp_path / "work"
    killed, calls = _train_counting(engine, "m2", rows, RESUMABLE, work, fail_at=8)  # dies during step 8
    assert killed is None and len(calls) == 8
    (ckpt,) = [p for p in work.iterdir() if "checkpoint" in p.name]  # only the newest, no half-written one
    assert ckpt.name == "checkpoint-6"
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:  # m2 alone, in its training dtype
        assert len(list(f.keys())) == len(want_weights)
        assert {f.get_tensor(k).dtype for k in f.keys()} == {v.dtype for v in want_weights.values()}
    assert not [p for p in ckpt.iterdir() if p.is_dir()], "no other adapter is saved in a checkpoint"

    with caplog.at_level("INFO", logger="minibt.engine"):
        got, calls = _train_counting(engine, "m2", rows, RESUMABLE, work)
    assert "resuming m2 from step 6" in caplog.text
    assert len(calls) == 4, "steps 7-10 only: the 6 steps' batches are skipped, not trained again"
    # CPU, one thread, same sampler seed and epoch, same RNG state: the resumed run is bit-identical
    got_weights = lora_state(engine, "m2")
    assert all(torch.equal(got_weights[k], want_weights[k]) and got_weights[k].dtype == want_weights[k].dtype for k in want_weights)
    assert got["train_loss"] == want["train_loss"] and got["log_history"] == want["log_history"] and got["steps"] == 10
    for name, state in others.items():
        after = lora_state(engine, name)
        assert all(torch.equal(state[k], after[k]) for k in state), f"{name} changed while m2 resumed"
    engine.check_trainable("m2")  # the resumed weights went into m2's own parameters, nothing else trains
    engine.delete_adapter("m2")

    # another fingerprint (here the learning rate): the checkpoint is not resumed, and the log says why
    caplog.clear()
    with caplog.at_level("INFO", logger="minibt.engine"):
        _, calls = _train_counting(engine, "m2", rows, dataclasses.replace(RESUMABLE, learning_rate=1e-3), work)
    assert "not resuming m2 from checkpoint-9" in caplog.text and "learning_rate: 0.005 before, 0.001 now" in caplog.text
    assert "resuming m2 from" not in caplog.text.replace("not resuming m2 from", "") and len(calls) == 10
    engine.delete_adapter("m2")
    caplog.clear()
    with caplog.at_level("INFO", logger="minibt.engine"):  # other rows: not resumed either
        _, calls = _train_counting(engine, "m2", rows[:-1], dataclasses.replace(RESUMABLE, learning_rate=1e-3), work)
    assert "not resuming" in caplog.text and "other training rows" in caplog.text and len(calls) == 10
    engine.delete_adapter("m2")

    engine_mod.clear_checkpoints(work)
    assert not list(work.glob("*checkpoint*"))


def test_a_checkpoint_made_after_out_of_memory_resumes_with_the_smaller_batch(engine, tmp_path, caplog):
    rows, work = pairs(engine, 20), tmp_path / "work"
    # batch 4 runs out of memory: the retry trains at 2 x 2 and is killed during its step 5 (forward 9)
    killed, calls = _train_counting(engine, "m2", rows, RESUMABLE, work, oom_above=2, fail_at=9)
    assert killed is None and [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-3"]
    with caplog.at_level("INFO", logger="minibt.engine"):
        got, calls = _train_counting(engine, "m2", rows, RESUMABLE, work)
    assert "ran out of memory; resuming with batch_size 2 x grad_accum 2" in caplog.text
    assert "resuming m2 from step 3" in caplog.text
    assert calls == [2] * 14 and got["steps"] == 10  # steps 4-10 at batch 2 x 2, no new out-of-memory attempt
    engine.delete_adapter("m2")

