"""The engine's unsloth backend, end to end on the tiny 4-bit Llama. Run by test_unsloth_backend.py in its
own process, because importing unsloth patches transformers and trl for the whole process.

Usage: python tests/unsloth_backend_check.py MODEL_DIR WORK_DIR [DTYPE]   (DTYPE: model.dtype, default auto)
On CUDA (tests/test_gpu.py) it checks the same isolation there; the tolerances are the caller's.
Prints one line `RESULT {json}` as the last line of stdout; the pytest side asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)  # two threads collapse throughput on 2-core VMs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from minibt.stack_guards import import_unsloth  # noqa: E402  imports no transformers

t_start = time.time()
import_unsloth()  # before transformers, as unsloth asks; the way the engine imports it

t_import = time.time() - t_start

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minibt.engine import load as engine_mod  # noqa: E402  (has_gpu, and the guard_bnb_cpu its loaders call)
from minibt.engine import Engine  # noqa: E402
from minibt.recipe import LoraSection, ModelSection, TrainSection  # noqa: E402
from tiny_engine import lora_grads_vs_dequantized_reference, lora_state, pairs  # noqa: E402


def main(model_dir: str, work: str, dtype: str = "auto") -> dict:
    import bitsandbytes as bnb

    out: dict = {"import_seconds": round(t_import, 1)}
    e = Engine.load(ModelSection(name=model_dir, backend="unsloth", quantization="nf4", max_length=128, dtype=dtype),
                    LoraSection(r=8, alpha=16), seed=0)
    out["backend"] = e.backend
    out["device"], out["dtype"] = e.device.type, str(e.dtype).removeprefix("torch.")
    out["peft_model"] = type(e.model).__name__
    quantized = [m for m in e.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    out["linear4bit"] = len(quantized)
    out["repacking_guarded"] = engine_mod.has_gpu() or all(not m.support_avx512bf16_for_cpu for m in quantized)

    steps = TrainSection(epochs=1, max_steps=10, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0)
    out["train"] = {}
    base_before = {k: v.clone() for k, v in e.model.state_dict().items() if "lora_" not in k}
    embeddings = e.model.get_base_model().get_input_embeddings().weight
    embedding_bytes = embeddings.detach().cpu().view(torch.uint8).numpy().tobytes()  # fix_untrained_tokens runs on CUDA
    out["train"]["myx"] = e.train("myx", pairs(e), steps, os.path.join(work, "myx"))["train_loss"]
    myx_before = lora_state(e, "myx")
    out["train"]["m0"] = e.train("m0", pairs(e), steps, os.path.join(work, "m0"))["train_loss"]
    myx_after = lora_state(e, "myx")
    out["adapters"] = e.adapters
    out["myx_bit_identical"] = all(torch.equal(myx_before[k], myx_after[k]) for k in myx_before) and bool(myx_before)
    base_after = {k: v for k, v in e.model.state_dict().items() if "lora_" not in k}
    out["base_bit_identical"] = all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    out["embedding_bytes_identical"] = embeddings.detach().cpu().view(torch.uint8).numpy().tobytes() == embedding_bytes
    out["m0_trained"] = any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora_state(e, "m0").items() if "lora_B" in k)

    errors = []
    for name in ("m0", "myx", "m0", "myx"):
        for trainable in (True, False):
            try:
                with e.use(name, trainable=trainable):
                    e.check_trainable(name if trainable else None)
                    if e.model.training != trainable:
                        errors.append(f"{name} trainable={trainable}: model.training={e.model.training}")
            except RuntimeError as err:
                errors.append(f"{name} trainable={trainable}: {err}")
    out["trainable_errors"] = errors

    prompt = [pairs(e, 1)[0]["prompt"]]
    out["generate"] = {a: e.infer.generate(a, prompt, max_new_tokens=6)[0] for a in ("m0", "base", "myx")}

    prompts = [p["prompt"] for p in pairs(e, 4)]
    before, _ = e.infer.next_token_probs("m0", prompts, "Score:", list("12345"))
    e.save_adapter("m0", os.path.join(work, "saved-m0"))
    e.load_adapter("m0_again", os.path.join(work, "saved-m0"))
    after, _ = e.infer.next_token_probs("m0_again", prompts, "Score:", list("12345"))
    base_probs, _ = e.infer.next_token_probs("base", prompts, "Score:", list("12345"))
    out["reload_max_abs_diff"] = float(abs(after - before).max())
    out["adapter_vs_base_max_abs_diff"] = float(abs(before - base_probs).max())
    e.delete_adapter("m0_again")
    out["adapters_after_delete"] = e.adapters

    out["lora_grad_rel_error"] = lora_grads_vs_dequantized_reference(model_dir, backend="unsloth", dtype=dtype)
    out["lora_grad_rel_error_unguarded"] = _unguarded_grad_error(model_dir)
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def _unguarded_grad_error(model_dir: str) -> float | None:
    """The same check with both repacking guards off (minibt's and unsloth's own): shows it can fail."""
    from bitsandbytes.functional import has_avx512bf16
    from unsloth_zoo.cpu import loader as cpu_loader

    if engine_mod.has_gpu() or not has_avx512bf16():
        return None  # bitsandbytes never repacks here, so the trap cannot spring
    saved = engine_mod.guard_bnb_cpu, cpu_loader._disable_bnb_cpu_weight_packing
    engine_mod.guard_bnb_cpu = cpu_loader._disable_bnb_cpu_weight_packing = lambda model: 0
    try:
        return lora_grads_vs_dequantized_reference(model_dir, backend="unsloth")
    finally:
        engine_mod.guard_bnb_cpu, cpu_loader._disable_bnb_cpu_weight_packing = saved


if __name__ == "__main__":
    result = main(*sys.argv[1:4])
    print("RESULT " + json.dumps(result), flush=True)
