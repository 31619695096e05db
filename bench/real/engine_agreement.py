"""One adapter trained on the NF4 base, run by every path that runs it outside the training engine.

    MINIBT_CACHE=/work/cache python bench/real/engine_agreement.py [--run RUN] [--pairs PAIRS.jsonl]
        [--model FOLDER] [--out bench/results/real-engine-agreement.json]

Rubric curation (the five digits' expected score) of the same pairs by the same m0 adapter on: the HF engine
on the NF4 base (what a run curates with), the HF engine on the NF4 base dequantized, vLLM on that folder
(what inference.engine=vllm serves on a CPU), and, for reference, the HF engine on the original 16-bit
weights (what vLLM's CPU build and export used before). Keep decisions at the thresholds, largest score
difference. Then `minibt export`'s merge (bf16 and fp32) against the adapter on the NF4 base: greedy
answers to held-out prompts, how many identical (and the old merge into the original weights).

With --run, the run's m0, recipe and round-1 threshold; else an m0-like adapter is trained here on the
cpu-135m recipe (forward settings, a few steps). Pairs: --pairs (rows with instruction and output), else
IFEval's real instructions with the base's own greedy answers, a third of them given another row's answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import time
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REAL = "/work/cache/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-v1"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a finished run: its m0, recipe and threshold")
    ap.add_argument("--adapter", help="an m0 adapter folder trained on the NF4 base (instead of training one here)")
    ap.add_argument("--model", default=REAL)
    ap.add_argument("--pairs", help="JSONL rows with instruction and output (default: built from IFEval's prompts)")
    ap.add_argument("--n-pairs", type=int, default=100)
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--steps", type=int, default=16, help="training steps of the m0-like adapter (no --run)")
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--work", default="/tmp/engine-agreement")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "real-engine-agreement.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from minibt import io
    from minibt.engine import Engine
    from minibt.engine.dequantize import dequantized_base
    from minibt.recipe import load_recipe
    from minibt.roles import forward_prompt, round_threshold, score_pairs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.run:
        from minibt.base_model import model_of
        from minibt.rundir import RunDir

        rd = RunDir.open(args.run)
        recipe = rd.recipe()
        recipe = dataclasses.replace(recipe, model=model_of(recipe, rd.manifest.get("base_model")))
        adapter, threshold = rd.adapter("m0"), round_threshold(rd, recipe, 1)
    else:
        recipe = load_recipe(HERE.parent.parent / "recipes" / "cpu-135m.yaml", [f"model.name={args.model}"])
        adapter, threshold = Path(args.adapter or work / "m0"), recipe.curate.threshold
    model_cfg = recipe.model
    ifeval = [r["prompt"] for r in io.read_jsonl(HERE / "data" / "ifeval" / "input_data.jsonl") if len(r["prompt"]) < 400]
    held_out = ifeval[-args.n_prompts:]  # the export's prompts: in no training or curation row
    result: dict = {"model": model_cfg.name, "quantization": model_cfg.quantization, "threshold": threshold}

    # 1. the NF4 engine: pairs, the adapter, its scores and greedy answers
    nf4 = Engine.load(model_cfg, recipe.lora, seed=recipe.run.seed)
    if args.pairs:
        pairs = io.read_jsonl(args.pairs)[: args.n_pairs]
        result["pairs"] = {"source": args.pairs}
    else:
        n_train = 0 if args.run or args.adapter else 40
        instructions = ifeval[: n_train + args.n_pairs]
        rendered = [nf4.text.render([{"role": "user", "content": i}]) for i in instructions]
        t0 = time.time()
        answers = nf4.infer.generate("base", rendered, max_new_tokens=args.answer_tokens, batch_size=16)
        seed = [{"instruction": i, "output": a} for i, a in zip(instructions[:n_train], answers[:n_train])]
        rest = list(zip(instructions[n_train:], answers[n_train:]))
        shift = len(rest) // 3  # a third answered with another row's answer: a spread of scores
        pairs = [{"instruction": i, "output": rest[(k + 7) % len(rest)][1] if k < shift else a} for k, (i, a) in enumerate(rest)]
        result["pairs"] = {"source": "IFEval prompts (bench/real/data/ifeval) with the base's greedy answers, "
                                     f"{shift} of them mismatched", "answer_seconds": round(time.time() - t0, 1)}
        io.write_jsonl(work / "pairs.jsonl", pairs)
        if not (args.run or args.adapter):
            train = dataclasses.replace(recipe.forward, max_steps=args.steps, epochs=3.0, save_steps=0)
            rows = [{"prompt": forward_prompt(nf4.text, recipe, r["instruction"]), "completion": r["output"]} for r in seed]
            t0 = time.time()
            nf4.train("m0", rows, train, work / "train-m0")
            nf4.save_adapter("m0", adapter)
            result["adapter_training"] = {"rows": len(rows), "steps": args.steps, "learning_rate": train.learning_rate,
                                          "batch_size": train.batch_size, "seconds": round(time.time() - t0, 1)}
    result["pairs"]["n"] = len(pairs)
    if "m0" not in nf4.adapters:
        nf4.load_adapter("m0", adapter)
    result["adapter"] = {"path": str(adapter), "sha256": sha256(adapter / "adapter_model.safetensors")}
    forward = [forward_prompt(nf4.text, recipe, i) for i in held_out]
    scores, seconds = {}, {}

    def score(name: str, engine) -> None:
        t0 = time.time()
        scores[name] = np.array([r["score"] for r in score_pairs(engine, recipe, "m0", pairs)], dtype=np.float64)
        seconds[name] = round(time.time() - t0, 1)
        io.write_json(work / "scores.json", {k: v.tolist() for k, v in scores.items()})  # what a killed run leaves

    score("hf_nf4", nf4.infer)
    answers = {"nf4_adapter": nf4.infer.generate("m0", forward, max_new_tokens=args.answer_tokens, batch_size=8)}
    del nf4
    gc.collect()

    # 2. 16-bit HF engines with the same adapter: the dequantized folder, and the original weights
    t0 = time.time()
    folder = dequantized_base(model_cfg)
    result["dequantized"] = {"folder": folder, "seconds_incl_cache_lookup": round(time.time() - t0, 1)}
    for name, weights in (("hf_dequantized", folder), ("hf_original_weights", model_cfg.name)):
        plain = Engine.load(dataclasses.replace(model_cfg, name=weights, quantization="none"), recipe.lora, seed=recipe.run.seed)
        plain.load_adapter("m0", adapter)
        score(name, plain.infer)
        del plain
        gc.collect()

    # 3. vLLM (its CPU build has no bitsandbytes: it serves the dequantized folder)
    from minibt.engine.vllm import VllmEngine

    vllm = VllmEngine.start(model_cfg, recipe.lora, dataclasses.replace(recipe.inference, engine="vllm"), seed=recipe.run.seed)
    result["vllm"] = {"serves": vllm.llms[0].llm_engine.vllm_config.model_config.model, "start": vllm.started}
    vllm.load_adapter("m0", adapter)
    score("vllm_dequantized", vllm)
    vllm.close()
    del vllm
    gc.collect()

    ref = scores["hf_nf4"]
    result["rubric"] = {}
    for name, s in scores.items():
        row = {"median": round(float(np.median(s)), 4), "seconds": seconds[name]}
        for t in sorted({threshold, 3.5, 4.5, round(float(np.median(ref)), 4)}):
            row[f"kept_at_{t}"] = int((s >= t).sum())
            if name != "hf_nf4":
                row[f"keep_agreement_at_{t}"] = round(float(np.mean((s >= t) == (ref >= t))), 4)
        if name != "hf_nf4":
            row["max_abs_score_diff"] = float(np.abs(s - ref).max())
        result["rubric"][name] = row

    # 4. export's merge (fp32 math, cast to the dtype) against the adapter on the NF4 base: greedy answers
    import minibt.engine.dequantize as dq
    from minibt.export import _merge

    stand_in_run = types.SimpleNamespace(recipe=lambda: recipe)
    original_dequantized_base = dq.dequantized_base
    exports = (("export_bf16", "bfloat16", True), ("export_fp32", "float32", True), ("old_export_original_weights_bf16", "bfloat16", False))
    for name, dtype, dequantized in exports:
        out = work / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        dq.dequantized_base = original_dequantized_base if dequantized else (lambda cfg, cache=None: cfg.name)
        try:
            _merge(stand_in_run, adapter, model_cfg.name, dtype, out)
        finally:
            dq.dequantized_base = original_dequantized_base
        merged = Engine.load(dataclasses.replace(model_cfg, name=str(out), quantization="none", dtype=dtype),
                             recipe.lora, seed=recipe.run.seed)
        answers[name] = merged.infer.generate("base", forward, max_new_tokens=args.answer_tokens, batch_size=8)
        del merged
        gc.collect()
    result["export"] = {"prompts": len(forward), "max_new_tokens": args.answer_tokens, "greedy_identical_to_nf4_adapter": {
        name: sum(a == b for a, b in zip(answers[name], answers["nf4_adapter"])) for name, _, _ in exports}}
    result["export"]["examples"] = [{k: v[i] for k, v in answers.items()} for i in range(2)]
    result["seconds"] = round(time.time() - t_start, 1)
    result["command"] = "MINIBT_CACHE=/work/cache python bench/real/engine_agreement.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and v != ap.get_default(k))
    io.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("rubric", "export")}, indent=2))


if __name__ == "__main__":
    main()
