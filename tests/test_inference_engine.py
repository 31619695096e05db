"""The recipe's inference engine (minibt/inference.py; tests/toy/test_inference.py is the toy world's), the `inference` section's engine keys: what auto
picks and why, the refusals, and a run's vLLM engine started on first use, recorded, stopped before
training on a GPU (a stand-in engine: no vLLM needed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from minibt import inference
from minibt.errors import RecipeError
from minibt.recipe import InferenceSection, from_dict
from minibt.rundir import RunDir


def section(**keys) -> InferenceSection:
    return from_dict({"toy": {}, "inference": keys}).inference


@pytest.mark.parametrize("keys, message", [
    ({"engine": "hf", "max_num_seqs": 8}, "inference.max_num_seqs: read only by the vLLM engine"),
    ({"engine": "hf", "gpu_memory_utilization": 0.9}, "inference.gpu_memory_utilization: read only by the vLLM engine"),
    ({"gpu_memory_utilization": 1.5}, r"inference.gpu_memory_utilization: must be in \(0.0, 1.0\]"),
    ({"max_num_seqs": 0}, "inference.max_num_seqs: must be > 0"),
    ({"kv_cache_gib": -1.0}, "inference.kv_cache_gib: must be > 0"),
    ({"kv_cache_gib": 2.0, "gpu_memory_utilization": 0.8}, "inference.gpu_memory_utilization: inference.kv_cache_gib sets"),
    ({"engine": "sglang"}, "inference.engine: 'sglang' is not one of auto, hf, vllm"),
    ({"enable_prefix_caching": "yes"}, "inference.enable_prefix_caching: expected true or false"),
])
def test_bad_engine_keys_are_one_line_naming_the_key(keys, message):
    with pytest.raises(RecipeError, match=message) as err:
        section(**keys)
    assert "\n" not in str(err.value)


def test_vllm_with_ray_workers_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("vllm", "ray") else real(name, *a))
    with pytest.raises(RecipeError, match="inference.workers: Ray workers run the HF engine"):
        section(engine="vllm", workers=2)


def test_more_vllm_engines_than_gpus_are_refused_before_anything_loads(monkeypatch):
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RecipeError, match="inference.data_parallel_size: 2 vLLM engines need as many GPUs, this machine has 1"):
        section(engine="vllm", data_parallel_size=2)
    assert section(engine="vllm").data_parallel_size == 1


def test_vllm_missing_is_refused_before_anything_loads(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RecipeError, match="inference.engine: vllm is not installed"):
        section(engine="vllm")


def test_auto_picks_vllm_only_with_vllm_and_a_gpu(monkeypatch):
    import minibt.engine.load as load

    real = importlib.util.find_spec
    for installed, gpu, workers, want in [(True, True, 1, "vllm"), (True, False, 1, "hf"), (False, True, 1, "hf"),
                                          (True, True, 2, "hf")]:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, i=installed: (object() if i else None)
                            if name == "vllm" else real(name, *a))
        monkeypatch.setattr(load, "has_gpu", lambda g=gpu: g)
        engine, why = inference.choose(InferenceSection(workers=workers))
        assert engine == want and why.startswith("auto: "), (installed, gpu, workers, why)
    assert inference.choose(InferenceSection(engine="hf")) == ("hf", "inference.engine is hf")


class FakeVllm:
    name = "vllm"

    def __init__(self):
        self.started = {"seconds": 1.5, "memory_gib": 0.25}
        self.loaded, self.closed = ["m0"], False

    def delete_adapter(self, name: str) -> None:
        self.loaded.remove(name) if name in self.loaded else None

    def close(self) -> float:
        self.closed = True
        return 0.5


@pytest.mark.parametrize("gpu", [False, True])
def test_a_runs_vllm_engine_starts_once_is_recorded_and_stops_before_training_on_a_gpu(monkeypatch, gpu, tmp_path):
    import minibt.engine.load as load

    started = []
    monkeypatch.setattr(inference, "start_vllm", lambda recipe, model: started.append(FakeVllm()) or started[-1])
    monkeypatch.setattr(inference, "choose", lambda cfg: ("vllm", "inference.engine is vllm"))
    monkeypatch.setattr(load, "has_gpu", lambda: gpu)
    import minibt.base_model as base_model

    monkeypatch.setattr(base_model, "model_of", lambda recipe, recorded: "the base")
    rd, hf = RunDir(tmp_path, read_manifest=False), object()
    run = inference.RunInference(rd, from_dict({"toy": {}}), lambda: hf)
    assert run.separate and run.engine() is run.engine() is started[0] and len(started) == 1
    assert rd.manifest["inference"] == {"engine": "vllm", "why": "inference.engine is vllm"}
    assert rd.manifest["inference_engines"][0]["seconds"] == 1.5 and rd.manifest["inference_engines"][0]["memory_gib"] == 0.25
    run.before_training("m0")
    assert "m0" not in started[0].loaded  # retrained: served afresh when next asked for
    assert started[0].closed is gpu  # a GPU's memory goes to training; a CPU keeps the engine warm
    run.engine()
    assert len(started) == (2 if gpu else 1) and len(rd.manifest["inference_engines"]) == len(started)
    run.close()
    assert started[-1].closed and all("stopped" in e for e in rd.manifest["inference_engines"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == rd.manifest  # each note saved


def test_the_hf_engine_is_the_runs_own(monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "choose", lambda cfg: ("hf", "inference.engine is hf"))
    hf = object()
    rd = RunDir(tmp_path, read_manifest=False)
    run = inference.RunInference(rd, from_dict({"toy": {}}), lambda: hf)
    assert not run.separate and run.engine() is hf
    run.before_training("m0")
    run.close()
    assert rd.manifest == {}  # nothing started, nothing noted


def test_the_memory_estimate_counts_the_vllm_engine_beside_the_training_base(monkeypatch):
    from minibt import memory

    recipe = from_dict({"toy": {}, "inference": {"max_num_seqs": 8}})
    plain = {s.stage: s for s in memory.estimate(recipe).stages}
    monkeypatch.setattr(inference, "choose", lambda cfg: ("vllm", "inference.engine is vllm"))
    est = memory.estimate(recipe)
    shape, c = est.shape, 4 if recipe.model.dtype == "float32" else 2
    for s in est.stages:
        if s.stage in ("augment", "curate_r1", "evaluate"):
            want = memory.vllm_bytes(recipe, shape, s.parts["weights"], est.lora_params, c)
            assert s.parts["vllm"] == want > s.parts["weights"] and s.parts["kv_cache"] == 0, s.stage
            assert s.parts["weights"] == plain[s.stage].parts["weights"]  # the training base stays
        else:
            assert "vllm" not in s.parts and s.parts == plain[s.stage].parts, s.stage
    text = memory.format_estimate(est)
    assert "vllm" in text.splitlines()[3] and "inference.gpu_memory_utilization" in text
    fixed = from_dict({"toy": {}, "inference": {"kv_cache_gib": 3.0}})
    assert memory.vllm_bytes(fixed, shape, 0, 0, c) == 4 * memory.GiB  # the KV cache and 1 GiB of activations


def test_dry_run_says_which_engine_auto_picks_and_why():
    from click.testing import CliRunner

    from minibt.cli import main

    out = CliRunner().invoke(main, ["run", "toy", "inference.engine=hf", "--dry-run"])
    assert out.exit_code == 0 and "inference engine: hf (inference.engine is hf)" in out.output
    out = CliRunner().invoke(main, ["run", "toy", "--dry-run"])
    assert out.exit_code == 0 and "inference engine: %s (%s)" % inference.choose(InferenceSection()) in out.output
