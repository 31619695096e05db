"""The engine's unsloth backend (its CPU fallback here; the GPU path on a GPU), in its own process.

unsloth patches transformers and trl when imported, so it is never imported in the pytest process:
tests/unsloth_backend_check.py runs the engine in a subprocess and prints a JSON result to assert on.
Skipped where unsloth is not installed (CI installs it: .ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("unsloth") is None:  # find_spec does not import it
    pytest.skip("unsloth is not installed (pip install --no-deps unsloth unsloth_zoo, see .ci/run)", allow_module_level=True)

SCRIPT = Path(__file__).with_name("unsloth_backend_check.py")


@pytest.fixture(scope="module")
def result(tiny_model_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("unsloth-work")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tiny_model_dir, str(work)],
        capture_output=True, text=True, timeout=300, env=env, cwd=SCRIPT.parents[1],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the unsloth subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def test_the_base_is_loaded_by_unsloth_in_4bit(result):
    assert result["backend"] == "unsloth"
    assert result["peft_model"].startswith("PeftModel")
    assert result["linear4bit"] > 0, "unsloth fell back to 16-bit weights"
    assert result["repacking_guarded"], "bitsandbytes may repack 4-bit weights on CPU (the gradient trap)"


def test_training_a_role_leaves_the_other_role_and_the_base_bit_identical(result):
    assert result["adapters"] == ["myx", "m0"]
    assert result["m0_trained"]
    assert result["myx_bit_identical"], "myx changed while m0 trained"
    assert result["base_bit_identical"], "the 4-bit base changed during training"
    assert result["embedding_bytes_identical"], "the shared embeddings changed (unsloth's fix_untrained_tokens?)"


def test_only_the_active_role_is_trainable_after_switches(result):
    assert result["trainable_errors"] == []


def test_generation_with_an_adapter_differs_from_the_base(result):
    gen = result["generate"]
    assert gen["m0"] != gen["base"]
    assert result["adapter_vs_base_max_abs_diff"] > 1e-4


def test_a_saved_adapter_reloads_with_the_same_scores(result):
    assert result["reload_max_abs_diff"] < 1e-6
    assert result["adapters_after_delete"] == ["myx", "m0"]


def test_lora_gradients_after_inference_match_a_dequantized_reference(result):
    assert result["lora_grad_rel_error"] < 1e-3


def test_the_gradient_check_fails_without_the_repacking_guards(result):
    """Shows the check above has teeth: with minibt's and unsloth's guards off, gradients go wrong."""
    if result["lora_grad_rel_error_unguarded"] is None:
        pytest.skip("no AVX512-BF16 CPU (or a GPU): bitsandbytes never repacks, so the trap cannot spring")
    assert result["lora_grad_rel_error_unguarded"] > 0.05


def test_unsloth_stays_out_of_the_pytest_process(result):
    assert "unsloth" not in sys.modules, "something imported unsloth in the pytest process: it patches transformers/trl"
