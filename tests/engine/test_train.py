"""Training a role (minibt/engine/train.py): one fresh trl trainer per role, only its adapter changes, the
SFTConfig, out-of-memory retries, packing, and the GPU path's training hazards pinned on the CPU (bf16
autocast, the base's embeddings). GPU-only parts: tests/test_gpu.py and bench/device-check.sh."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from minibt.engine import Engine, sft_config
from minibt.engine.train import RoleTrainer
from minibt.recipe import LoraSection, ModelSection, TrainSection
from tiny_engine import lora_state, pairs

STEPS = TrainSection(epochs=1, max_steps=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0)
CHOICES = list("12345")


def _load(model_dir: str, **model) -> Engine:
    return Engine.load(ModelSection(name=model_dir, max_length=128, **model), LoraSection(r=8, alpha=16), seed=0)


def _prompts(e: Engine, n: int = 6) -> list[str]:
    return [p["prompt"] + " north" * k for k, p in enumerate(pairs(e, n))]  # mixed lengths: left padding


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


def test_the_sft_config_carries_the_recipe_and_the_checkpoint_plan(tmp_path):
    cfg = TrainSection(epochs=2, max_steps=7, batch_size=3, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.1,
                       lr_scheduler="linear", weight_decay=0.01, report_to="none")
    args = sft_config(cfg, 96, torch.float32, 5, tmp_path, packing=False, save_steps=3, run_name="m1")
    assert (args.output_dir, args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == \
        (str(tmp_path), 7, 3, 2)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.weight_decay, args.max_length) == (1e-3, "linear", 0.01, 96)
    assert args.completion_only_loss and not args.packing and not args.bf16 and args.use_cpu
    assert (args.save_strategy.value, args.save_steps, args.seed, args.data_seed, args.run_name) == ("steps", 3, 5, 5, "m1")
    assert args.logging_steps == 7 and args.report_to == []
    none = sft_config(cfg, 96, torch.bfloat16, 0, tmp_path, packing=True)
    assert none.save_strategy.value == "no" and none.bf16 and none.packing  # bf16 autocasts on a CPU too
    assert args.train_sampling_strategy == "random"
    grouped = sft_config(dataclasses.replace(cfg, group_by_length=True), 96, torch.float32, 0, tmp_path, packing=False)
    assert grouped.train_sampling_strategy == "group_by_length"


def test_training_retries_out_of_memory_with_the_same_effective_batch(engine, tmp_path):
    calls: list[int] = []

    def oom_above_4(module, args, kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        calls.append(n)
        if n > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = engine.model.get_base_model().register_forward_pre_hook(oom_above_4, with_kwargs=True)
    try:
        result = engine.train("m3", pairs(engine, 8), TrainSection(epochs=1, max_steps=12, batch_size=8,
                                                                   learning_rate=5e-3, warmup_ratio=0.0), tmp_path)
    finally:
        handle.remove()
    assert calls[0] == 8 and max(calls[1:]) <= 4 and result["steps"] > 0
    engine.delete_adapter("m3")


def test_group_by_length_batches_rows_of_similar_length(engine, tmp_path):
    # rows of 0 to 45 repeats: drawn at random, a batch of 4 pads its short rows to its longest; transformers
    # sorts groups of len(rows) // 16 batches (here 4), so the rows are enough for a group of several batches
    rows = [{**p, "completion": p["completion"] + " north" * (3 * (k % 16))} for k, p in enumerate(pairs(engine, 16) * 4)]
    padding: dict[bool, float] = {}
    for grouped in (False, True):
        masks: list[torch.Tensor] = []

        def keep_mask(module, args, kwargs):
            masks.append(kwargs["attention_mask"])

        handle = engine.model.get_base_model().register_forward_pre_hook(keep_mask, with_kwargs=True)
        try:
            engine.train("m3", rows, TrainSection(epochs=1, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0,
                                                  group_by_length=grouped, save_steps=0), tmp_path / str(grouped))
        finally:
            handle.remove()
        engine.delete_adapter("m3")
        assert len(masks) == 16 and all(m.shape[0] == 4 for m in masks)
        padding[grouped] = sum(float((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert padding[True] < 0.1 < padding[False], padding


def test_training_retry_starts_after_the_failed_trainer_and_optimizer_are_freed(engine, tmp_path, monkeypatch):
    from trl import SFTTrainer

    failed: list[weakref.ref] = []
    alive_at_retry: list[list[bool]] = []
    training_step = SFTTrainer.training_step

    def out_of_memory_once(self, *args, **kwargs):
        if not failed:
            failed.extend([weakref.ref(self), weakref.ref(self.optimizer)])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return training_step(self, *args, **kwargs)

    train_once = RoleTrainer._train_once

    def spy(self, name, rows, cfg, *args, **kwargs):
        if failed:
            alive_at_retry.append([ref() is not None for ref in failed])
        return train_once(self, name, rows, cfg, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory_once)
    monkeypatch.setattr(RoleTrainer, "_train_once", spy)
    result = engine.train("m3", pairs(engine, 8), STEPS, tmp_path)
    assert alive_at_retry == [[False, False]], "the failed attempt's trainer/optimizer were still alive at the retry"
    assert result["steps"] == STEPS.max_steps
    engine.delete_adapter("m3")


# --- packing: only where attention keeps packed rows apart -------------------------------------


def test_packing_only_where_attention_keeps_rows_apart(random_lora_engine, monkeypatch):
    engine = random_lora_engine
    assert engine.packing(False) is False
    assert engine.packing(True) is False  # sdpa on a CPU: packed rows would see each other
    monkeypatch.setattr(engine.model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert engine.packing(True) is True


def test_padding_free_rows_leak_into_each_other_on_sdpa_with_a_cache(random_lora_engine):
    """Why packing stays off on sdpa/eager: trl's padding-free batch is one row with position_ids
    restarting per example; transformers keeps the examples apart only when no KV cache exists."""
    engine = random_lora_engine
    tok = engine.tokenizer
    seqs = [tok(t)["input_ids"] for t in ("the king is red.", "what is the color of the north river")]
    flat = torch.tensor([seqs[0] + seqs[1]])
    positions = torch.tensor([list(range(len(seqs[0]))) + list(range(len(seqs[1])))])
    with engine.use("rater"), torch.no_grad():
        alone = engine.model(input_ids=torch.tensor([seqs[1]]), use_cache=False).logits[0]
        kept_apart = engine.model(input_ids=flat, position_ids=positions, use_cache=False).logits[0, len(seqs[0]):]
        leaked = engine.model(input_ids=flat, position_ids=positions, use_cache=True).logits[0, len(seqs[0]):]
    assert torch.allclose(alone, kept_apart, atol=1e-4)
    assert not torch.allclose(alone, leaked, atol=1e-2)


# --- accelerate's autocast wrapper does not outlive training -----------------------------------

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
    out[name] = [e.infer.next_token_probs(name, prompts, "Score:", list("12345"))[0].tolist(),
                 e.infer.completion_logprobs(name, prompts, completions).tolist()]
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
    here = {name: [e.infer.next_token_probs(name, prompts, "Score:", CHOICES)[0].tolist(),
                   e.infer.completion_logprobs(name, prompts, completions).tolist()] for name in ("m0", "probe")}
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


# --- the base's embeddings stay as loaded -----------------------------------------------------


def test_training_a_role_leaves_the_base_embeddings_byte_identical(engine, tmp_path, monkeypatch):
    e = engine
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
