"""Speed and memory of each stage on the real model, against this machine's own measured limit.

    MINIBT_CACHE=/work/cache python bench/real/speed.py --run runs/real/s0 [--n 32] [--steps 4] [--rounds 3]
        [--threads 0] [--configs nf4:float32 none:float32 none:float32:whole none:bfloat16] [--vllm] [--device cuda]
        [--out bench/results/real-speed.json] [--profile STAGE]

One process, the run's adapters (myx, m0) and data, the cpu-135m recipe's settings:
1. roofline: dense matmul GFLOP/s (float32, bfloat16) on 1 and the run's threads, copy bandwidth
   (minibt/bench/roofline.py), before the stages and again after; `best_gflops`, the better of the two
   readings, is the limit every stage is set against.
2. each base config (quantization:dtype, the HF engine; `:whole`: each batch one forward and the adapter not
   folded, as on a GPU: the CPU engine before both) loaded side by side, and per stage, `--rounds`
   interleaved rounds (config A, B, C, A, B, C, ...): augment `--n` texts (myx), rubric curation and
   likelihood curation of `--n` pairs (m0), and `--steps` training steps of a fresh myx-like and m0-like
   adapter on the run's rows. Per stage and config: median seconds, tokens/s (tokens that are not padding),
   executed matmul GFLOP/s (roofline.FlopCounter, training x2), model GFLOP/s (the executed figure times the
   share of positions that are not padding) and its fraction of `best_gflops`; the medians' ratio to the
   recipe's config; outputs compared to it (identical instructions, score rank correlation).
   A dtype whose matmul runs under a tenth of float32's here is skipped with that figure as the reason.
   --vllm: vLLM's CPU build on the inference stages (LoRA on the unquantized base) in the same rounds; its
   FLOPs are the recipe config's count (the same work; vLLM's layers are not torch Linear modules).
--profile STAGE: instead of timing, one run of STAGE on the recipe's config under torch.profiler.
Peak memory per stage is apart (bench/real/memory.py: a process per stage, beside the estimate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE_CONFIG = "none:float32"  # what cpu-135m runs: the ratios are against it


class Tokens:
    """Positions the causal LM was run on, and those of them that are not padding."""

    def __init__(self, model: torch.nn.Module):
        self.total = self.real = 0
        lm = next(m for m in model.modules() if type(m).__name__.endswith("ForCausalLM"))
        # the decoder under the LM head: peft calls the causal LM's forward directly, which skips its hooks
        self.handle = lm.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.total += ids.numel()
        self.real += int(mask[:, -ids.shape[1]:].sum()) if mask is not None else ids.numel()

    def reset(self) -> None:
        self.total = self.real = 0


def stages(engine: Any, inf: Any, recipe: Any, run: Any, n: int, steps: int, work: Path) -> dict[str, Any]:
    """name -> a callable running that stage on the sample once, returning what is compared across configs.
    `engine`: the HF engine that trains (None: inference stages only, on `inf`)."""
    from minibt import io
    from minibt.roles import score_pairs
    from minibt.stages.augment import write_instructions
    from minibt.stages.backward import backward_rows
    from minibt.stages.forward import forward_rows

    corpus = io.read_jsonl(run.data("corpus"))[:n]
    pairs = [r for r in io.read_jsonl(run.data("augmented")) if r.get("instruction")][:n]
    seed = io.read_jsonl(run.data("seed"))
    likelihood = dataclasses.replace(recipe, curate=dataclasses.replace(recipe.curate, method="likelihood"))
    inference = {
        "augment": lambda: [r["instruction"] for r in write_instructions(inf, recipe.augment, corpus, seed=0)],
        "curate_rubric": lambda: [r["score"] for r in score_pairs(inf, recipe, "m0", pairs)],
        "curate_likelihood": lambda: [r["score"] for r in score_pairs(inf, likelihood, "m0", pairs)],
    }
    if engine is None:
        return inference
    # exactly `steps` optimizer steps' rows: one pass, the same rows whatever order a sampler draws them in
    myx_rows = backward_rows(engine, seed)[: steps * recipe.backward.batch_size * recipe.backward.grad_accum]
    m0_rows = forward_rows(engine, recipe, seed, [])[: steps * recipe.forward.batch_size * recipe.forward.grad_accum]

    def train(name: str, rows: list[dict[str, str]], cfg: Any) -> float:
        result = engine.train(name, rows, dataclasses.replace(cfg, max_steps=steps), tempfile.mkdtemp(dir=work))
        engine.delete_adapter(name)
        return result["train_loss"]

    return {
        **inference,
        "train_myx": lambda: train("speed_myx", myx_rows, recipe.backward),
        "train_m0": lambda: train("speed_m0", m0_rows, recipe.forward),
    }


def compare(out: Any, ref: Any) -> dict[str, Any]:
    from minibt.bench.stats import spearman

    if isinstance(out, float):
        return {"train_loss": out, "recipe_train_loss": ref}
    if out and isinstance(out[0], str):
        return {"identical": round(sum(a == b for a, b in zip(out, ref)) / len(out), 3)}
    return {"spearman": spearman(out, ref)}


def profile(stage: Any) -> None:
    """Where one run of a stage spends its time, op by op (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stage()  # warm-up: first calls build caches and thread pools
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        stage()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished cpu-135m run (its adapters and data)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the engines on the GPU "
                    "(bench/device-real.sh), set against its matmul figure at a large shape")
    ap.add_argument("--configs", nargs="+", default=["nf4:float32", RECIPE_CONFIG, f"{RECIPE_CONFIG}:whole", "none:bfloat16"])
    ap.add_argument("--reference", default=RECIPE_CONFIG, help="the config the others are compared to")
    ap.add_argument("--stages", nargs="+", default=None)
    ap.add_argument("--vllm", action="store_true", help="also vLLM's CPU build on the inference stages (needs vllm)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real-speed.json")
    ap.add_argument("--profile", metavar="STAGE", help="instead: torch.profiler over one run of STAGE on the recipe's "
                    "config (after a warm-up run), the top ops by self CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from minibt.base_model import model_of
    from minibt.bench.roofline import FlopCounter, roofline
    from minibt.bench.stats import load_average, timed
    from minibt.engine import Engine
    from minibt.recipe import load_recipe
    from minibt.recipes import builtin_path
    from minibt.rundir import RunDir

    roof = roofline(threads, device=args.device)
    print(json.dumps(roof), flush=True)
    run = RunDir.open(args.run)
    # the run's data and adapters; training as the shipped recipe trains now (the run may predate it)
    shipped = load_recipe(builtin_path("cpu-135m"))
    recipe = dataclasses.replace(run.recipe(), backward=shipped.backward, forward=shipped.forward)
    work = Path(tempfile.mkdtemp(prefix="minibt-speed-"))
    engines, skipped = {}, {}
    for config in args.configs:
        quantization, dtype, *variant = config.split(":")
        gflops = roof.get(f"matmul_gflops_{dtype}", {}).get(str(threads)) if args.device == "cpu" else None
        if gflops is not None and gflops < roof["matmul_gflops_float32"][str(threads)] / 10:
            skipped[config] = f"{dtype} matmul runs {gflops} GFLOP/s here (float32: {roof['matmul_gflops_float32'][str(threads)]})"
            continue
        model = dataclasses.replace(model_of(recipe, run.manifest.get("base_model")), quantization=quantization, dtype=dtype,
                                    device="auto" if args.device == "cuda" else "cpu")
        engine = Engine.load(model, recipe.lora, seed=recipe.run.seed)
        if variant == ["whole"]:  # the HF engine as a GPU runs it: each batch one forward, the LoRA path unfolded
            engine.infer.max_pad_share, engine.infer.roles.fold = 1.0, False
        for name in ("myx", "m0"):
            engine.infer.load_adapter(name, run.adapter(name))
        engines[config] = (stages(engine, engine.infer, recipe, run, args.n, args.steps, work),
                           FlopCounter(engine.model), Tokens(engine.model))
    if args.vllm:  # vLLM's CPU build serves the unquantized base: the recipe config's work, counted there
        from minibt.inference import start_vllm

        model = dataclasses.replace(model_of(recipe, run.manifest.get("base_model")), quantization="none")
        vllm = start_vllm(recipe, model)
        for name in ("myx", "m0"):
            vllm.load_adapter(name, run.adapter(name))
        engines["vllm"] = (stages(None, vllm, recipe, run, args.n, args.steps, work), None, None)
    names = args.stages or list(engines[args.reference][0])
    if args.profile:
        profile(engines[args.reference][0][args.profile])
        return
    result: dict[str, Any] = {"roofline": roof, "device": args.device, "reference": args.reference, "threads": threads,
                              "n": args.n, "train_steps": args.steps, "rounds": args.rounds, "run": str(args.run), "skipped": skipped, "stages": {},
                              "load_average_before": load_average()}
    for stage in names:
        per: dict[str, Any] = {c: {"seconds": [], "flops": 0, "tokens": 0, "positions": 0} for c in engines}
        outputs: dict[str, Any] = {}
        for _ in range(args.rounds):
            for config, (run_stage, flops, tokens) in engines.items():
                if stage not in run_stage:
                    continue
                if flops is None:  # not countable in this process's modules: the recipe config's count
                    outputs[config], s = timed(run_stage[stage])
                    per[config]["seconds"].append(s)
                    per[config].update({k: per[args.reference][k] for k in ("flops", "tokens", "positions")})
                    continue
                flops.flops = 0
                tokens.reset()
                with flops.counting():
                    outputs[config], s = timed(run_stage[stage])
                per[config]["seconds"].append(s)
                factor = 2 if stage.startswith("train") else 1  # LoRA's backward: the input gradients only
                per[config].update(flops=flops.flops * factor, tokens=tokens.real, positions=tokens.total)
        per = {c: p for c, p in per.items() if p["seconds"]}
        for config, p in per.items():
            s = statistics.median(p["seconds"])
            executed = p["flops"] / s / 1e9
            model = executed * p["tokens"] / max(p["positions"], 1)
            p.update(median_s=round(s, 2), seconds=[round(x, 2) for x in p["seconds"]], tokens_per_s=round(p["tokens"] / s, 1),
                     executed_gflops=round(executed, 1), model_gflops=round(model, 1))
            if args.reference in per and config != args.reference:
                ratios = [a / b for a, b in zip(p["seconds"], per[args.reference]["seconds"])]
                p["time_vs_recipe"] = round(statistics.median(ratios), 3)
                p["outputs_vs_recipe"] = compare(outputs[config], outputs[args.reference])
        result["stages"][stage] = per
        print(stage, json.dumps({c: {k: v for k, v in p.items() if k != "seconds"} for c, p in per.items()}), flush=True)
    result["load_average_after"] = load_average()
    # the limit measured again, after the stages: one reading can come out low (2 threads once gave 1 thread's
    # figure); the better of the two is the limit every fraction is set against
    result["roofline_after"] = roofline(threads, device=args.device)
    roof["best_gflops"] = max(roof["best_gflops"], result["roofline_after"]["best_gflops"])
    for per in result["stages"].values():
        for p in per.values():
            p["fraction_of_best"] = round(p["model_gflops"] / roof["best_gflops"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
