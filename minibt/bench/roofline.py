"""This machine's own limits, measured: dense matmul throughput and memory bandwidth, and a FLOP counter
that sets what a stage did against them.

A stage's work is counted as the matrix products its model ran: every `nn.Linear` forward (the decoder's
projections, LoRA's two small factors, the lm_head where logits are computed) adds 2 x in x out per row it
multiplied, padding included; the attention's own products (scores and the weighted sum) are not counted
(about 2 x layers x q_dim x context per token, a few percent at these lengths). A LoRA training step adds its
backward: the frozen base needs only the gradient of its input (as many FLOPs as its forward), so a training
step is counted as 2x its forward, not the 3x of full fine-tuning.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

MATMUL_SHAPE = (1024, 576, 1536)  # a batch of tokens through SmolLM2-135M's MLP: the shape its stages multiply


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, threads: int, shape: tuple[int, int, int] = MATMUL_SHAPE, seconds: float = 1.0,
                  device: str = "cpu") -> float:
    """Best GFLOP/s of repeated (m x k) @ (k x n) products on `threads` torch threads, over five timed rounds."""
    m, k, n = shape
    with _threads(threads):
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, generator=gen, device=device).to(dtype)
        b = torch.randn(k, n, generator=gen, device=device).to(dtype)
        for _ in range(3):  # warm: the first products on a new thread count start its pool (measured 2x slow)
            a @ b
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        reps = max(1, min(1000, int(seconds / 5 / max(time.perf_counter() - t0, 1e-6))))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        return round(2 * m * k * n / best / 1e9, 1)


def copy_gbs(threads: int, mib: int = 256, device: str = "cpu") -> float:
    """Best GB/s of copying a `mib` MiB float32 tensor (read + write counted), over five rounds."""
    with _threads(threads):
        src = torch.ones(mib * 2**20 // 4, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return round(2 * src.numel() * 4 / best / 1e9, 1)


def roofline(threads: int, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), device: str = "cpu") -> dict[str, Any]:
    """Matmul GFLOP/s per dtype, copy bandwidth, and the best matmul figure (`best_gflops`, the limit stages are set
    against). On a CPU: on 1 and `threads` threads, at the stages' shape. On a GPU: at the stages' shape, which is
    too small to fill it, and at PEAK_SHAPE, which does (the limit)."""
    if device != "cpu":
        return _gpu_roofline(dtypes, device)
    counts = sorted({1, threads})
    out: dict[str, Any] = {"threads": threads, "matmul_shape": list(MATMUL_SHAPE), "cpu": torch.backends.cpu.get_cpu_capability()}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        # half a second each: the repetitions adapt, so a dtype without a fast kernel (bf16 on AVX2) stays short
        out[f"matmul_gflops_{name}"] = {str(t): matmul_gflops(dtype, t, seconds=0.5) for t in counts}
    out["copy_gbs"] = {str(t): copy_gbs(t) for t in counts}
    out["best_gflops"] = max(v[str(threads)] for k, v in out.items() if k.startswith("matmul_gflops_"))
    return out


PEAK_SHAPE = (8192, 8192, 8192)  # large enough to keep a GPU's tensor cores busy


def _gpu_roofline(dtypes: tuple[torch.dtype, ...], device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "matmul_shape": list(MATMUL_SHAPE),
                           "peak_shape": list(PEAK_SHAPE), "tf32": torch.backends.cuda.matmul.allow_tf32}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        out[f"matmul_gflops_{name}"] = {shape: matmul_gflops(dtype, 1, dims, seconds=0.5, device=device)
                                        for shape, dims in (("matmul_shape", MATMUL_SHAPE), ("peak_shape", PEAK_SHAPE))}
    out["copy_gbs"] = copy_gbs(1, mib=1024, device=device)
    out["best_gflops"] = max(v["peak_shape"] for k, v in out.items() if k.startswith("matmul_gflops_"))
    return out


class FlopCounter:
    """Counts the matmul FLOPs of every `nn.Linear` forward under a model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.flops = model, 0
        self._hooks: list[Any] = []

    def _hook(self, module: torch.nn.Linear, inputs: tuple[Any, ...], _output: Any) -> None:
        x = inputs[0]
        self.flops += 2 * module.in_features * module.out_features * (x.numel() // x.shape[-1])

    @contextlib.contextmanager
    def counting(self) -> Iterator[FlopCounter]:
        self._hooks = [m.register_forward_hook(self._hook) for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            yield self
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
