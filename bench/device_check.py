"""The GPU check, for the day a GPU machine is lent: `bench/device-check.sh` runs it.

    python bench/device_check.py OUT_DIR           # every check in order, one JSON: OUT_DIR/device-check.json
    python bench/device_check.py --part NAME ...   # one part, in its own process (the script calls these)

In order: the unsloth multi-adapter isolation check on CUDA (tests/unsloth_backend_check.py, fp16);
fp16 on both backends (20 steps: finite falling loss, fp32 LoRA weights, batched == one by one for
generation and scoring on mixed lengths, no autocast wrapper left, scoring builds no KV cache, scores
equal a fresh process's); a real out-of-memory (memory capped) and its retry; the 1B-shape bench on
unsloth in fp16 with T4 batch sizes, its peak MiB per phase beside the dry-run estimate. Each part is a
subprocess with its own time limit, so one that hangs or crashes is recorded and the next still runs.
Without CUDA it stops at once (exit 3) and says so. Nothing here has run on a GPU yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULT = "RESULT "
T4 = ["augment.batch_size=32", "curate.batch_size=16", "backward.batch_size=4", "backward.grad_accum=4"]
PARTS = [  # name, seconds allowed (the whole check must stay under 8 minutes)
    ("isolation", 75), ("fp16_transformers", 60), ("fp16_unsloth", 60), ("out_of_memory", 60), ("bench_1b_unsloth_fp16", 200),
]


def _answer(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def part_isolation(model_dir: str, work: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "unsloth_backend_check.py"), model_dir, work, "float16"],
                          capture_output=True, text=True, env=_env())
    return _parse(proc)


def part_fp16(model_dir: str, work: str, backend: str) -> dict:
    import torch

    if backend == "unsloth":
        import unsloth  # noqa: F401  before transformers
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection, TrainSection
    from tiny_engine import pairs

    e = Engine.load(ModelSection(name=model_dir, backend=backend, max_length=256, dtype="float16"), LoraSection(r=8, alpha=16))
    out: dict = {"backend": e.backend, "device": e.device.type}
    r = e.train("m0", pairs(e, 32), TrainSection(max_steps=20, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0),
                os.path.join(work, "m0"))
    losses = [h["loss"] for h in r["log_history"]]
    out["losses"] = losses
    out["loss_finite_and_falling"] = bool(all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0])
    out["lora_dtypes"] = sorted({str(p.dtype) for n, p in e.model.named_parameters() if ".m0." in n})
    out["autocast_wrapper_left"] = "_original_forward" in e.model.__dict__
    prompts = [p["prompt"] + " north" * k for k, p in enumerate(pairs(e, 8))]
    batched = e.infer.generate("m0", prompts, max_new_tokens=12, batch_size=8)
    single = [e.infer.generate("m0", [p], max_new_tokens=12)[0] for p in prompts]
    out["generation_batched_equals_single"] = sum(a == b for a, b in zip(batched, single))
    caches: list = []
    hook = e.model.get_base_model().register_forward_hook(lambda m, a, o: caches.append(getattr(o, "past_key_values", None)))
    probs, _ = e.infer.variant(prefix_cache=False).next_token_probs("m0", prompts, "Score:", list("12345"), batch_size=8)
    hook.remove()
    out["scoring_kv_caches"] = sum(c is not None for c in caches)
    one = [e.infer.next_token_probs("m0", [p], "Score:", list("12345"))[0][0] for p in prompts]
    out["scoring_batched_vs_single_max_abs"] = float(max(abs(a - b).max() for a, b in zip(probs, one)))
    e.save_adapter("m0", os.path.join(work, "saved-m0"))
    fresh = subprocess.run([sys.executable, __file__, "--part", "fresh_scores", model_dir, work, backend, json.dumps(prompts)],
                           capture_output=True, text=True, env=_env())
    theirs = _parse(fresh)
    if "probs" in theirs:
        out["fresh_process_max_abs"] = float(abs(torch.tensor(theirs["probs"]) - torch.tensor(probs)).max())
    else:
        out["fresh_process"] = theirs
    out["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def part_fresh_scores(model_dir: str, work: str, backend: str, prompts: str) -> dict:
    if backend == "unsloth":
        import unsloth  # noqa: F401
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection

    e = Engine.load(ModelSection(name=model_dir, backend=backend, max_length=256, dtype="float16"), LoraSection(r=8, alpha=16))
    e.load_adapter("m0", os.path.join(work, "saved-m0"))
    return {"probs": e.infer.next_token_probs("m0", json.loads(prompts), "Score:", list("12345"), batch_size=8)[0].tolist()}


def part_out_of_memory(model_dir: str, work: str) -> dict:
    """A REAL out-of-memory: the 1B shape under a memory cap, batch 64 x 768 tokens; the retry halves it."""
    import logging

    import torch

    from minibt.bench import build_random_model
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection, TrainSection

    big = build_random_model("llama-3.2-1b", model_dir, Path(work) / "llama-1b")
    e = Engine.load(ModelSection(name=big, backend="transformers", max_length=768, dtype="float16"), LoraSection(r=16, alpha=32))
    cap = (torch.cuda.memory_allocated() + 6 * 2**30) / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap)  # the weights plus 6 GiB: batch 64 does not fit, batch 4 does
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("minibt.engine").addHandler(handler)
    rows = [{"prompt": "word " * 300, "completion": "text " * 400}] * 64
    t0 = time.time()
    try:
        r = e.train("m0", rows, TrainSection(max_steps=2, batch_size=64, learning_rate=1e-4, warmup_ratio=0.0), work)
        out = {"trained_steps": r["steps"]}
    except Exception as err:  # noqa: BLE001  recorded: the JSON says what happened
        out = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    out.update(retries=[w for w in warnings if "out of memory" in w], seconds=round(time.time() - t0, 1),
               memory_cap_fraction=round(cap, 4), peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    return out


def dry_run_estimate() -> tuple[dict[str, int], str]:
    """`--dry-run`'s estimate (MiB per stage) of the Colab recipe at the bench's T4 batch sizes; no GPU needed."""
    from minibt import memory
    from minibt.recipe import load_recipe

    path = next(p for p in (ROOT / "recipes" / "colab-t4.yaml", ROOT / "minibt" / "recipes" / "colab-t4.yaml") if p.exists())
    est = memory.estimate(load_recipe(path, ["model.dtype=float16", *T4]))
    return {s.stage: round(s.total / 2**20) for s in est.stages}, est.source


def part_bench(work: str) -> dict:
    estimate, source = dry_run_estimate()
    out_json = Path(work) / "bench.json"
    cmd = [sys.executable, "-m", "minibt.cli", "bench", "--gpu-config", "llama-3.2-1b", "--backend", "unsloth", "--json",
           "--out", str(out_json), "--set", "model.dtype=float16", *[x for k in T4 for x in ("--set", k)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    result = json.loads(out_json.read_text()) if out_json.exists() else {"rc": proc.returncode, "stderr": proc.stderr[-2000:]}
    return {"dry_run_estimate_mib": estimate, "estimate_source": source,
            "peak_memory_mib": result.get("peak_memory_mib"), "bench": result}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def _parse(proc: subprocess.CompletedProcess) -> dict:
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        return {"rc": proc.returncode, "stdout": proc.stdout[-1500:], "stderr": proc.stderr[-3000:]}
    return json.loads(lines[-1][len(RESULT):])


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(f"device-check: no CUDA GPU visible to torch {torch.__version__}: this check runs on a lent GPU machine "
              "(bench/gpu.md); nothing was run", file=sys.stderr)
        raise SystemExit(3)


def main(out_dir: str) -> int:
    require_cuda()
    import torch

    from conftest import build_tiny_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    model_dir = build_tiny_model(work / "tiny")
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "parts": {}}
    for name, limit in PARTS:
        t0 = time.time()
        args = {"isolation": [model_dir, str(work / name)], "fp16_transformers": [model_dir, str(work / name), "transformers"],
                "fp16_unsloth": [model_dir, str(work / name), "unsloth"], "out_of_memory": [model_dir, str(work / name)],
                "bench_1b_unsloth_fp16": [str(work / name)]}[name]
        Path(work / name).mkdir(exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--part", name, *args], capture_output=True, text=True,
                                  timeout=limit, env=_env())
            result = _parse(proc)
        except subprocess.TimeoutExpired as err:
            result = {"timeout_s": limit, "stderr": (err.stderr or b"")[-2000:].decode("utf-8", "replace")
                      if isinstance(err.stderr, bytes) else str(err.stderr or "")[-2000:]}
        result["seconds"] = round(time.time() - t0, 1)
        report["parts"][name] = result
        (out / "device-check.json").write_text(json.dumps(report, indent=1))  # partial results survive a kill
        print(f"device-check: {name} done in {result['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--part":
        part, rest = sys.argv[2], sys.argv[3:]
        require_cuda()
        fn = {"isolation": part_isolation, "fp16_transformers": lambda m, w, b: part_fp16(m, w, b),
              "fp16_unsloth": lambda m, w, b: part_fp16(m, w, b), "fresh_scores": part_fresh_scores,
              "out_of_memory": part_out_of_memory, "bench_1b_unsloth_fp16": part_bench}[part]
        _answer(fn(*rest))
    elif len(sys.argv) == 2:
        raise SystemExit(main(sys.argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
