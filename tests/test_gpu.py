"""GPU-only checks: the product path (CUDA, bitsandbytes 4-bit kernels, unsloth). Deselected by default;
run with `pytest -m gpu` on a machine with a CUDA GPU (and unsloth installed for the unsloth cases)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

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


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_whole_run_on_the_gpu(tiny_model_dir, tmp_path, backend):
    """The whole method through the CLI, in its own process (unsloth patches transformers on import)."""
    if backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed: pip install -e '.[unsloth]'")
    io.write_jsonl(tmp_path / "seed.jsonl", SEED)
    io.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    (tmp_path / "r.yaml").write_text(f"""
model: {{name: {tiny_model_dir}, backend: {backend}, quantization: nf4, max_length: 2048}}
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


def test_engine_on_cuda_keeps_roles_apart_and_decodes_like_generate(tiny_model_dir, tmp_path):
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection, TrainSection

    e = Engine.load(ModelSection(name=tiny_model_dir, backend="transformers", max_length=256), LoraSection(r=8, alpha=16))
    assert e.device.type == "cuda"
    rows = [{"prompt": e.render([{"role": "user", "content": r["instruction"]}]), "completion": r["output"]} for r in SEED]
    steps = TrainSection(max_steps=10, batch_size=4, learning_rate=5e-3)
    e.train("myx", rows, steps, tmp_path / "myx")
    before = {k: v.clone() for k, v in e.model.state_dict().items() if ".myx." in k}
    e.train("m0", rows, steps, tmp_path / "m0")
    assert all(torch.equal(before[k], v) for k, v in e.model.state_dict().items() if k in before)

    prompts = [r["prompt"] for r in rows[:8]]
    ours = e.generate("m0", prompts, max_new_tokens=12, batch_size=8)
    with e.use("m0"), torch.no_grad():
        ids, mask = e._left_pad(e._encode(prompts, room=12))
        out = e.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=e.tokenizer.pad_token_id, eos_token_id=e.tokenizer.eos_token_id)
    assert ours == [e.tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]

    batch, _ = e.next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=8)
    single = [e.next_token_probs("m0", [p], "Score:", list("12345"))[0][0] for p in prompts]
    assert batch == pytest.approx(torch.tensor(single).numpy(), abs=1e-2)  # bf16 kernels: looser than CPU
