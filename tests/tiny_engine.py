"""Helpers for tests that drive the engine on the tiny Llama (tests/conftest.py): rows, adapter
weights, and the bitsandbytes CPU gradient check. Imported by tests/engine/, test_bench_bare.py,
unsloth_backend_check.py and bench/device_check.py."""

from __future__ import annotations

import torch

from minibt.engine import Engine, lora_config
from minibt.engine.adapters import adapter_of
from minibt.recipe import LoraSection, ModelSection

WORDS = ["king", "queen", "river", "city", "mountain", "north", "south", "color"]


def pairs(engine, n: int = 16) -> list[dict[str, str]]:
    return [
        {"prompt": engine.text.render([{"role": "user", "content": f"what is the {w}"}]), "completion": f"the {w} is red."}
        for w in (WORDS * 4)[:n]
    ]


def lora_state(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.named_parameters() if adapter_of(k) == name}


def lora_grads_vs_dequantized_reference(model_dir: str, backend: str = "auto", dtype: str = "auto") -> float:
    """Largest relative error of 4-bit LoRA gradients, after an inference pass, vs an fp32 reference.

    The reference is the same network with each NF4 weight dequantized into plain fp32 Linear layers
    BEFORE any inference, and the same LoRA weights, on the engine's device (each model gets its own
    copy of the batch). Tolerances are the caller's: 1e-3 holds for fp32 compute, not for bf16/fp16.
    """
    import bitsandbytes as bnb
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
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
    ref = get_peft_model(ref, lora_config(e.lora), adapter_name="m0")
    set_peft_model_state_dict(ref, get_peft_model_state_dict(e.model, adapter_name="m0"), adapter_name="m0")

    batch = e.tokenizer(["the king is red and the river is blue."], return_tensors="pt")
    e.infer.generate("m0", ["the king"], max_new_tokens=2)  # an eval no-grad forward: the trap springs here

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
