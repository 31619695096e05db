"""The machine's limit and the FLOP counter the real-model speed bench sets each stage against."""

from __future__ import annotations

import pytest
import torch

from minibt.bench.roofline import FlopCounter, copy_gbs, matmul_gflops, roofline


def test_the_counter_counts_each_linear_forward_exactly_and_only_while_counting():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    counter = FlopCounter(model)
    x = torch.randn(3, 5, 8)  # 15 rows
    with counter.counting():
        model(x)
    assert counter.flops == 2 * 15 * (8 * 16 + 16 * 4)
    model(x)  # hooks removed: not counted
    assert counter.flops == 2 * 15 * (8 * 16 + 16 * 4)


def test_matmul_and_bandwidth_figures_are_measured_and_threads_restored():
    before = torch.get_num_threads()
    assert matmul_gflops(torch.float32, 1, shape=(64, 64, 64), seconds=0.05) > 0
    assert copy_gbs(1, mib=4) > 0
    assert torch.get_num_threads() == before


def test_roofline_names_the_best_figure_on_the_threads_asked(monkeypatch):
    import minibt.bench.roofline as rl

    figures = {(torch.float32, 1): 10.0, (torch.float32, 2): 19.0, (torch.bfloat16, 1): 30.0, (torch.bfloat16, 2): 55.0}
    monkeypatch.setattr(rl, "matmul_gflops", lambda dtype, t, **kw: figures[(dtype, t)])
    monkeypatch.setattr(rl, "copy_gbs", lambda t: 5.0 * t)
    roof = roofline(2)
    assert roof["matmul_gflops_float32"] == {"1": 10.0, "2": 19.0}
    assert roof["best_gflops"] == 55.0 and roof["copy_gbs"] == {"1": 5.0, "2": 10.0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the device machine")
def test_a_gpu_roofline_sets_stages_against_the_large_shape():
    roof = roofline(1, dtypes=(torch.bfloat16,), device="cuda")
    figures = roof["matmul_gflops_bfloat16"]
    assert figures["peak_shape"] > figures["matmul_shape"] > 0 and roof["best_gflops"] == figures["peak_shape"]
    assert roof["copy_gbs"] > 0
