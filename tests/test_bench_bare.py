"""The bench's bare trl side in its own process (minibt/bench/bare.py): the same training as in-process."""

from __future__ import annotations

import os

from minibt.bench.bare import BareSide
from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection, TrainSection
from tiny_engine import pairs


def test_the_bare_side_trains_alike_in_a_worker_without_unsloth(tiny_model_dir, tmp_path):
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=128), LoraSection(r=4, alpha=8), seed=0)
    rows = pairs(e, 8)
    cfg = TrainSection(max_steps=2, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0)
    here = BareSide(tiny_model_dir, e, rows)
    assert not here.isolate and here.where == "this process"  # transformers backend, no unsloth imported
    want = here(cfg, str(tmp_path / "here"))

    worker = BareSide(tiny_model_dir, e, rows, isolate=True)
    first, second = worker(cfg, str(tmp_path / "w1")), worker(cfg, str(tmp_path / "w2"))
    worker.close()
    assert first["pid"] == second["pid"] != os.getpid()  # one long-lived worker keeps the pairs interleaved
    assert first["unsloth_imported"] is False
    # the same training: the bare script's LoRA init draws from the process's global RNG, so not bit-equal
    assert abs(first["train_loss"] - want["train_loss"]) < 0.05 and abs(second["train_loss"] - want["train_loss"]) < 0.05
    assert first["seconds"] > 0


def test_an_engine_on_unsloth_gets_an_isolated_bare_side():
    class Fake:
        backend = "unsloth"

    assert BareSide("x", Fake(), []).isolate
