"""The bench's bare trl side, in a process of its own when the engine runs unsloth.

unsloth patches transformers, trl and peft on import (tests/test_unsloth_backend.py keeps it out of
pytest for that reason), so under `--backend unsloth` a bare script in the bench's process would train
with unsloth's patches loaded: `training_ratio` would compare unsloth with partly-unsloth. Here it runs
in one long-lived worker that never imports unsloth; the worker reads one JSON request a line and
answers `RESULT {json}`, so the bench keeps its interleaved pairs. Usage: `python -m minibt.bench.bare`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from minibt.bench.stats import timed

_RESULT = "RESULT "


def bare_trl_train(model_dir: str, engine: Any, rows: Sequence[dict[str, str]], cfg: Any, work_dir: str) -> dict[str, Any]:
    """The same training as `Engine.train`, written as a plain trl + peft script: its own base, loaded
    as the engine loads one (before the clock starts), get_peft_model and SFTTrainer with minibt's
    LoRA config and trainer arguments."""
    from datasets import Dataset
    from trl import SFTTrainer

    from minibt.engine import load_base, sft_config
    from minibt.engine.adapters import wrap

    model, tokenizer = load_base(dataclasses.replace(engine.model_cfg, name=model_dir))

    def run() -> Any:
        peft_model = wrap(model, engine.lora, engine.seed)
        args = sft_config(cfg, engine.model_cfg.max_length, engine.dtype, engine.seed, work_dir, packing=False)
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(list(rows)),
                             processing_class=tokenizer)
        return trainer.train()

    result, seconds = timed(run)
    return {"seconds": seconds, "train_loss": round(float(result.training_loss), 4)}


class BareSide:
    """Callable(cfg, work_dir) -> bench.bare_trl_train's result, in this process or in the worker."""

    def __init__(self, model_dir: str, engine: Any, rows: Sequence[dict[str, str]], isolate: bool | None = None):
        self.model_dir, self.engine, self.rows = model_dir, engine, list(rows)
        self.isolate = engine.backend == "unsloth" or "unsloth" in sys.modules if isolate is None else isolate
        self.where = "own process, unsloth not imported" if self.isolate else "this process"
        self._worker: subprocess.Popen | None = None

    def __call__(self, cfg: Any, work_dir: str) -> dict[str, Any]:
        if not self.isolate:
            return bare_trl_train(self.model_dir, self.engine, self.rows, cfg, work_dir)
        if self._worker is None:  # stdout carries the answers; the trainer's own prints go to stderr
            self._worker = subprocess.Popen([sys.executable, "-m", "minibt.bench.bare"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        e = self.engine
        request = {"model_dir": self.model_dir, "rows": self.rows, "cfg": dataclasses.asdict(cfg), "work_dir": work_dir,
                   "dtype": str(e.dtype).removeprefix("torch."), "model": dataclasses.asdict(e.model_cfg),
                   "lora": dataclasses.asdict(e.lora), "seed": e.seed}
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.write(json.dumps(request) + "\n")
        self._worker.stdin.flush()
        for line in self._worker.stdout:
            if line.startswith(_RESULT):
                answer = json.loads(line[len(_RESULT):])
                if "error" in answer:
                    raise RuntimeError(f"the bare trl worker failed: {answer['error']}")
                return answer
        raise RuntimeError(f"the bare trl worker exited (rc {self._worker.wait()}); its stderr says why")

    def close(self) -> None:
        if self._worker is not None:
            assert self._worker.stdin is not None  # started with stdin=PIPE
            self._worker.stdin.close()  # the worker ends at the end of its input
            self._worker.wait(timeout=60)
            self._worker = None


def _serve() -> None:
    import torch

    from minibt.recipe import LoraSection, ModelSection, TrainSection

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as the bench's own process
    out, sys.stdout = sys.stdout, sys.stderr  # library prints must not mix with the answers
    for line in sys.stdin:
        r = json.loads(line)
        engine = SimpleNamespace(dtype=getattr(torch, r["dtype"]), model_cfg=ModelSection(**r["model"]),
                                 lora=LoraSection(**r["lora"]), seed=r["seed"])
        try:
            answer = bare_trl_train(r["model_dir"], engine, r["rows"], TrainSection(**r["cfg"]), r["work_dir"])
            answer.update(pid=os.getpid(), unsloth_imported="unsloth" in sys.modules)
        except Exception as e:  # reported to the bench, which raises it there
            answer = {"error": f"{type(e).__name__}: {e}"}
        out.write(_RESULT + json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
