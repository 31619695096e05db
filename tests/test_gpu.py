"""GPU-only checks: the product path (CUDA, bitsandbytes 4-bit kernels, unsloth). Deselected by default;
run with `pytest -m gpu` on a machine with a CUDA GPU (and unsloth installed for the unsloth cases).

Dtype-aware: fp16 (a T4's only half precision) is always tested, bf16 where the GPU has it; exact
greedy equality is asserted only in fp32 compute, where batching cannot flip a near-tie."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minibt import io

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the device machine"),
]

SEED = [{"instruction": f"What is the color of the {t}?", "output": f"The {t} is {c}."}
        for t, c in [("king", "red"), ("queen", "blue"), ("river", "green"), ("city", "yellow")] * 4]
CORPUS = [{"text": f"The {a} of the {p} is {c}."} for a in ("color", "capital") for p in ("north", "south") for c in ("red", "blue")]
# batched vs one-by-one scoring, max abs difference of digit probabilities; LoRA gradients vs fp32
PROB_TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 3e-2}
GRAD_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 8e-2}


def _dtypes() -> list[str]:
    half = ["float16"]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        half.append("bfloat16")
    return ["float32", *half]


def _needs_unsloth() -> None:
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed: pip install -e '.[unsloth]'")


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_whole_run_on_the_gpu(tiny_model_dir, tmp_path, backend):
    """The whole method through the CLI, in its own process (unsloth patches transformers on import), in fp16."""
    if backend == "unsloth":
        _needs_unsloth()
    io.write_jsonl(tmp_path / "seed.jsonl", SEED)
    io.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    (tmp_path / "r.yaml").write_text(f"""
model: {{name: {tiny_model_dir}, backend: {backend}, quantization: nf4, max_length: 2048, dtype: float16}}
lora: {{r: 8, alpha: 16}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, dedup: false}}
backward: {{max_steps: 10, batch_size: 4, learning_rate: 1.0e-3}}
augment: {{max_new_tokens: 16, batch_size: 8}}
curate: {{threshold: 1.0, batch_size: 8}}
forward: {{max_steps: 10, batch_size: 4, learning_rate: 1.0e-3, rounds: 2}}
""")
    proc = subprocess.run([sys.executable, "-m", "minibt.cli", "run", "r.yaml", "--out", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == backend and manifest["base_loads"] == 1
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert manifest["stages"]["curate_r1"]["counts"]["unparseable"] == 0


@pytest.mark.parametrize("dtype", _dtypes())
def test_engine_on_cuda_trains_keeps_roles_apart_and_batches_like_single_rows(tiny_model_dir, tmp_path, dtype):
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection, TrainSection

    e = Engine.load(ModelSection(name=tiny_model_dir, backend="transformers", max_length=256, dtype=dtype), LoraSection(r=8, alpha=16))
    assert e.device.type == "cuda" and str(e.dtype) == f"torch.{dtype}"
    rows = [{"prompt": e.text.render([{"role": "user", "content": r["instruction"]}]), "completion": r["output"]} for r in SEED]
    steps = TrainSection(max_steps=20, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0)
    myx = e.train("myx", rows, steps, tmp_path / "myx")
    losses = [h["loss"] for h in myx["log_history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    lora = {p.dtype for n, p in e.model.named_parameters() if ".myx." in n}
    if dtype == "float16":
        assert lora == {torch.float32}, "fp16 mixed precision trains fp32 master LoRA weights"
    assert "_original_forward" not in e.model.__dict__, "accelerate's autocast wrapper outlived training"
    before = {k: v.clone() for k, v in e.model.state_dict().items() if ".myx." in k}
    e.train("m0", rows, steps, tmp_path / "m0")
    assert all(torch.equal(before[k], v) for k, v in e.model.state_dict().items() if k in before)

    prompts = [r["prompt"] + " king" * k for k, r in enumerate(rows[:8])]  # mixed lengths: left padding
    batched = e.infer.generate("m0", prompts, max_new_tokens=12, batch_size=8)
    single = [e.infer.generate("m0", [p], max_new_tokens=12)[0] for p in prompts]
    same = sum(a == b for a, b in zip(batched, single))
    assert same == len(prompts) if dtype == "float32" else same >= len(prompts) - 2, (batched, single)

    batch, _ = e.infer.next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=8)
    one = [e.infer.next_token_probs("m0", [p], "Score:", list("12345"))[0][0] for p in prompts]
    assert batch == pytest.approx(torch.tensor(one).numpy(), abs=PROB_TOLERANCE[dtype])


def test_the_unsloth_multi_adapter_check_on_cuda(tiny_model_dir, tmp_path):
    """tests/unsloth_backend_check.py (test_unsloth_backend.py runs it on the CPU fallback) on CUDA, fp16."""
    _needs_unsloth()
    script = Path(__file__).with_name("unsloth_backend_check.py")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(script.parents[1]))
    proc = subprocess.run([sys.executable, str(script), tiny_model_dir, str(tmp_path), "float16"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=script.parents[1])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["device"] == "cuda" and r["dtype"] == "float16" and r["linear4bit"] > 0
    assert r["adapters"] == ["myx", "m0"] and r["m0_trained"]
    assert r["myx_bit_identical"] and r["base_bit_identical"] and r["embedding_bytes_identical"]
    assert r["trainable_errors"] == []
    assert r["generate"]["m0"] != r["generate"]["base"] and r["adapter_vs_base_max_abs_diff"] > 1e-4
    assert r["reload_max_abs_diff"] < PROB_TOLERANCE["float16"]
    assert r["lora_grad_rel_error"] < GRAD_TOLERANCE["float16"]
