"""bench/device-check.sh and bench/device_check.py, the parts that run without a GPU: they stop at once and
say why when torch sees no CUDA, fit one device call, and the dry-run estimate they compare against works."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, HELPER = ROOT / "bench" / "device-check.sh", ROOT / "bench" / "device_check.py"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _helper():
    spec = importlib.util.spec_from_file_location("device_check", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_no_gpu
def test_the_script_stops_at_once_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent)})
    assert proc.returncode == 3 and "no CUDA GPU visible" in proc.stderr and "nothing was run" in proc.stderr
    assert not (tmp_path / "out").exists()


@needs_no_gpu
@pytest.mark.parametrize("args", [["OUT"], ["--part", "isolation", "x", "y"]])
def test_the_helper_stops_at_once_without_cuda(tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "no CUDA GPU visible to torch" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_parts_fit_one_device_call_of_under_8_minutes():
    helper = _helper()
    assert [name for name, _ in helper.PARTS] == ["isolation", "fp16_transformers", "fp16_unsloth", "out_of_memory",
                                                  "bench_1b_unsloth_fp16"]
    assert sum(limit for _, limit in helper.PARTS) <= 470 and "timeout 470" in SCRIPT.read_text()


def test_the_dry_run_estimate_it_compares_against(tmp_path):
    estimate, source = _helper().dry_run_estimate()
    assert source and estimate and all(mib > 500 for mib in estimate.values())  # a 1B base in 4-bit, T4 batches
