"""One training setting on the real model, timed: what chose cpu-135m's quantization, threads and batch.

    MINIBT_CACHE=/work/cache python bench/real/train_settings.py --run runs/real/s0 --quantization none --threads 2 \
        --batch 1 --grad-accum 4 [--group-by-length] [--role m0] [--rows 64]

One pass over the first `--rows` training rows of a role (myx: the run's seed reversed; m0: seed pairs) by a fresh
adapter, with the run's recipe changed as asked: every setting trains on the same rows, whatever order its
sampler draws them in. Prints one JSON line: seconds per micro-batch, the total, tokens (not padding) per second,
the share of positions that were padding, model GFLOP/s (4 x params x tokens: LoRA's backward needs only the
input gradients) against this process's matmul limit (minibt/bench/roofline.py), the final loss and the peak RSS
of the process. Run each setting in its own process (peak RSS is a process's high-water mark) and alternate them:
`for s in A B A B; do ...; done`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from speed import Tokens  # this folder's stage bench: the same count of positions and tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--quantization", default="none", choices=("nf4", "none"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="0: one per core")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--group-by-length", action="store_true", help="batches of rows of similar length")
    ap.add_argument("--role", default="myx", choices=("myx", "m0"))
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from minibt import io
    from minibt.base_model import model_of
    from minibt.bench.roofline import FlopCounter, roofline
    from minibt.bench.stats import peak_rss_mib
    from minibt.engine import Engine
    from minibt.rundir import RunDir
    from minibt.stages.backward import backward_rows
    from minibt.stages.forward import forward_rows

    run = RunDir.open(args.run)
    recipe = run.recipe()
    model = dataclasses.replace(model_of(recipe, run.manifest.get("base_model")), quantization=args.quantization, dtype=args.dtype)
    engine = Engine.load(model, recipe.lora, seed=recipe.run.seed)
    seed = io.read_jsonl(run.data("seed"))
    rows = (backward_rows(engine, seed) if args.role == "myx" else forward_rows(engine, recipe, seed, []))[: args.rows]
    steps, rest = divmod(len(rows), args.batch * args.grad_accum)
    if rest or not steps:
        raise SystemExit(f"--rows {len(rows)} is not a multiple of batch x grad_accum ({args.batch * args.grad_accum})")
    limit = roofline(torch.get_num_threads(), dtypes=(torch.float32,))["best_gflops"]
    flops, tokens = FlopCounter(engine.model), Tokens(engine.model)
    stamps: list[float] = []
    step = transformers.Trainer.training_step

    def timed_step(self, *a, **kw):  # each micro-batch's start
        stamps.append(time.perf_counter())
        return step(self, *a, **kw)

    transformers.Trainer.training_step = timed_step
    cfg = dataclasses.replace(recipe.backward if args.role == "myx" else recipe.forward, max_steps=steps,
                              batch_size=args.batch, grad_accum=args.grad_accum,
                              group_by_length=args.group_by_length)
    with flops.counting():
        result = engine.train(args.role, rows, cfg, tempfile.mkdtemp())
    stamps.append(time.perf_counter())
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    total = sum(seconds)
    model_gflops = 2 * flops.flops * tokens.real / tokens.total / total / 1e9
    print(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      "threads": torch.get_num_threads(), "micro_batch_s": [round(s, 2) for s in seconds],
                      "total_s": round(total, 1), "tokens_per_s": round(tokens.real / total, 1),
                      "padding": round(1 - tokens.real / tokens.total, 3), "model_gflops": round(model_gflops, 1),
                      "limit_gflops": limit, "fraction_of_limit": round(model_gflops / limit, 3),
                      "loss": result["train_loss"], "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
