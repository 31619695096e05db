"""One training setting on the real model, timed: what chose cpu-135m's quantization, threads and batch.

    MINIBT_CACHE=/work/cache python bench/real/train_settings.py --run runs/real/s0 --quantization none --threads 2 \
        --batch 1 --grad-accum 4 [--role m0] [--steps 6]

`--steps` optimizer steps of a fresh adapter (myx: the run's seed reversed; m0: seed pairs) with the run's recipe,
changed as asked. Prints one JSON line: seconds per micro-batch (the first, which pays one-time costs, apart), the
total after the first, the final loss and the peak RSS of the process. Run each setting in its own process
(peak RSS is a process's high-water mark) and alternate them: `for s in A B A B; do ...; done`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--quantization", default="none", choices=("nf4", "none"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="0: one per core")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--role", default="myx", choices=("myx", "m0"))
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from minibt import io
    from minibt.base_model import model_of
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
    rows = backward_rows(engine, seed) if args.role == "myx" else forward_rows(engine, recipe, seed, [])
    stamps: list[float] = []
    step = transformers.Trainer.training_step

    def timed_step(self, *a, **kw):  # each micro-batch's start
        stamps.append(time.perf_counter())
        return step(self, *a, **kw)

    transformers.Trainer.training_step = timed_step
    cfg = dataclasses.replace(recipe.backward if args.role == "myx" else recipe.forward, max_steps=args.steps,
                              batch_size=args.batch, grad_accum=args.grad_accum)
    result = engine.train(args.role, rows, cfg, tempfile.mkdtemp())
    stamps.append(time.perf_counter())
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      "threads": torch.get_num_threads(), "micro_batch_s": [round(s, 2) for s in seconds],
                      "total_s": round(sum(seconds), 1), "after_first_s": round(sum(seconds[1:]), 1), "loss": result["train_loss"],
                      "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
