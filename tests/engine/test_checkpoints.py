"""Checkpoints inside a training stage (minibt/engine/checkpoints.py): a killed training resumes where it was,
and the transformers internals the resume leans on are what it expects."""

from __future__ import annotations

import dataclasses
import inspect

import torch

from minibt.engine import clear_checkpoints
from minibt.recipe import TrainSection
from tiny_engine import lora_state, pairs

RESUMABLE = TrainSection(epochs=1, max_steps=10, batch_size=4, learning_rate=5e-3, warmup_ratio=0.1, save_steps=3)


class Killed(Exception):
    """Stands for SIGKILL / a lost Colab runtime in the middle of training."""


def _forwards(fail_at: int | None = None, calls: list[int] | None = None, oom_above: int | None = None):
    """A forward pre-hook counting forward passes (their batch sizes); it raises Killed on pass `fail_at`."""
    calls = [] if calls is None else calls

    def hook(module, args, kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if oom_above is not None and n > oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        calls.append(n)
        if fail_at is not None and len(calls) == fail_at:
            raise Killed

    return hook


def _train_counting(engine, name: str, rows, cfg, work, **hook_kwargs) -> tuple[dict | None, list[int]]:
    calls: list[int] = []
    handle = engine.model.get_base_model().register_forward_pre_hook(_forwards(calls=calls, **hook_kwargs), with_kwargs=True)
    try:
        return engine.train(name, rows, cfg, work), calls
    except Killed:
        engine.delete_adapter(name)  # as the stage runner does with a half-trained adapter
        return None, calls
    finally:
        handle.remove()


def test_a_killed_training_resumes_from_its_checkpoint_to_the_same_adapter(engine, tmp_path, caplog):
    from safetensors import safe_open

    rows = pairs(engine, 20)  # 5 optimizer steps an epoch: the checkpoint at step 6 sits inside the 2nd epoch
    want, calls = _train_counting(engine, "m2", rows, RESUMABLE, tmp_path / "reference")
    assert len(calls) == 10 and sorted(p.name for p in (tmp_path / "reference").glob("checkpoint-*")) == ["checkpoint-9"]
    want_weights = lora_state(engine, "m2")
    engine.delete_adapter("m2")
    others = {name: lora_state(engine, name) for name in ("myx", "m0")}

    work = tmp_path / "work"
    killed, calls = _train_counting(engine, "m2", rows, RESUMABLE, work, fail_at=8)  # dies during step 8
    assert killed is None and len(calls) == 8
    (ckpt,) = [p for p in work.iterdir() if "checkpoint" in p.name]  # only the newest, no half-written one
    assert ckpt.name == "checkpoint-6"
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:  # m2 alone, in its training dtype
        assert len(list(f.keys())) == len(want_weights)
        assert {f.get_tensor(k).dtype for k in f.keys()} == {v.dtype for v in want_weights.values()}
    assert not [p for p in ckpt.iterdir() if p.is_dir()], "no other adapter is saved in a checkpoint"

    with caplog.at_level("INFO", logger="minibt.engine"):
        got, calls = _train_counting(engine, "m2", rows, RESUMABLE, work)
    assert "resuming m2 from step 6" in caplog.text
    assert len(calls) == 4, "steps 7-10 only: the 6 steps' batches are skipped, not trained again"
    # CPU, one thread, same sampler seed and epoch, same RNG state: the resumed run is bit-identical
    got_weights = lora_state(engine, "m2")
    assert all(torch.equal(got_weights[k], want_weights[k]) and got_weights[k].dtype == want_weights[k].dtype for k in want_weights)
    assert got["train_loss"] == want["train_loss"] and got["log_history"] == want["log_history"] and got["steps"] == 10
    for name, state in others.items():
        after = lora_state(engine, name)
        assert all(torch.equal(state[k], after[k]) for k in state), f"{name} changed while m2 resumed"
    engine.check_trainable("m2")  # the resumed weights went into m2's own parameters, nothing else trains
    engine.delete_adapter("m2")

    # another fingerprint (here the learning rate): the checkpoint is not resumed, and the log says why
    caplog.clear()
    with caplog.at_level("INFO", logger="minibt.engine"):
        _, calls = _train_counting(engine, "m2", rows, dataclasses.replace(RESUMABLE, learning_rate=1e-3), work)
    assert "not resuming m2 from checkpoint-9" in caplog.text and "learning_rate: 0.005 before, 0.001 now" in caplog.text
    assert "resuming m2 from" not in caplog.text.replace("not resuming m2 from", "") and len(calls) == 10
    engine.delete_adapter("m2")
    caplog.clear()
    with caplog.at_level("INFO", logger="minibt.engine"):  # other rows: not resumed either
        _, calls = _train_counting(engine, "m2", rows[:-1], dataclasses.replace(RESUMABLE, learning_rate=1e-3), work)
    assert "not resuming" in caplog.text and "other training rows" in caplog.text and len(calls) == 10
    engine.delete_adapter("m2")

    clear_checkpoints(work)
    assert not list(work.glob("*checkpoint*"))


def test_a_checkpoint_made_after_out_of_memory_resumes_with_the_smaller_batch(engine, tmp_path, caplog):
    rows, work = pairs(engine, 20), tmp_path / "work"
    # batch 4 runs out of memory: the retry trains at 2 x 2 and is killed during its step 5 (forward 9)
    killed, calls = _train_counting(engine, "m2", rows, RESUMABLE, work, oom_above=2, fail_at=9)
    assert killed is None and [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-3"]
    with caplog.at_level("INFO", logger="minibt.engine"):
        got, calls = _train_counting(engine, "m2", rows, RESUMABLE, work)
    assert "ran out of memory; resuming with batch_size 2 x grad_accum 2" in caplog.text
    assert "resuming m2 from step 3" in caplog.text
    assert calls == [2] * 14 and got["steps"] == 10  # steps 4-10 at batch 2 x 2, no new out-of-memory attempt
    engine.delete_adapter("m2")


# --- the transformers internals the resume relies on -------------------------------------------
# transformers' own checkpointing saves every adapter of the PeftModel, not atomically, reloads each with
# peft's dtype autocast and restarts the loss accounting (checkpoints.py's docstring). minibt overrides two
# private Trainer methods and reads and writes private fields; these tests fail the day any of that changes
# in a transformers or trl release, naming what changed, before a resumed run silently trains differently.


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_private_trainer_methods_minibt_overrides_or_calls_keep_their_signatures():
    from transformers import Trainer

    from minibt.engine.checkpoints import _ResumableMixin

    assert _params(Trainer._save_checkpoint) == ["self", "model", "trial"] == _params(_ResumableMixin._save_checkpoint)
    assert _params(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert _params(_ResumableMixin._load_from_checkpoint) == _params(Trainer._load_from_checkpoint)
    assert inspect.signature(Trainer._load_from_checkpoint).parameters["model"].default is None
    for called in ("_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state"):  # write_checkpoint calls them
        assert _params(getattr(Trainer, called)) == ["self", "output_dir"], called


def test_the_training_loop_saves_loads_and_resets_where_the_overrides_expect():
    from transformers import Trainer
    from trl import SFTTrainer

    train = inspect.getsource(Trainer.train)
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in train  # our adapter-only load replaces it
    assert "self._save_checkpoint(model, trial)" in inspect.getsource(Trainer._maybe_log_save_evaluate)
    loop = inspect.getsource(Trainer._inner_training_loop)
    reset = [loop.index(s) for s in ("self._tr_loss = torch.tensor(0.0", "self._total_loss_scalar = 0.0",
                                     "self._globalstep_last_logged = self.state.global_step")]
    begin = loop.index("self.callback_handler.on_train_begin(")
    state = loop.index("self._init_training_state(")
    # the restore callback runs at on_train_begin: after the loaded state and the reset of the loss accounting
    assert state < min(reset) and max(reset) < begin < loop.index("self._run_epoch(")
    assert "self._total_loss_scalar / effective_global_step" in inspect.getsource(Trainer._finalize_training)
    init = inspect.getsource(SFTTrainer.__init__)  # trl's running metrics and token count, restored too
    assert "self._metrics = " in init and "self._total_train_tokens = 0" in init
