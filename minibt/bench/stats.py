"""The bench's statistics and measuring: rank agreement, interleaved timed pairs, their spread, memory."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# --- statistics ------------------------------------------------------------------------------


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    arr = np.asarray(x, dtype=float)
    order = np.argsort(arr, kind="mergesort")
    ranks = np.empty(len(arr))
    i = 0
    while i < len(arr):
        j = i
        while j + 1 < len(arr) and arr[order[j + 1]] == arr[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); None if undefined."""
    if len(a) != len(b):
        raise ValueError("spearman: sequences of different lengths")
    if len(a) < 2:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def tie_ceiling(b: Sequence[float]) -> float | None:
    """The highest Spearman any tie-free score can reach against `b`: that of a score ordering b's
    classes exactly (which order it gives inside a class of tied b changes nothing)."""
    return spearman([x + 1e-9 * i for i, x in enumerate(b)], b)


# --- measuring -------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Memory:
    """Peak memory per phase: CUDA peak allocation on a GPU (reset per phase), else the process's max RSS."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.phases[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            self.phases[name] = peak_rss_mib()  # monotone: the peak up to the end of this phase

    def report(self) -> dict[str, Any]:
        kind = "cuda_max_memory_allocated_mib" if torch.cuda.is_available() else "max_rss_mib_up_to_phase_end"
        return {"kind": kind, "phases": self.phases, "overall": max(self.phases.values(), default=peak_rss_mib())}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def interleaved_pairs(fast: Callable[[], Any], slow: Callable[[], Any], pairs: int,
                      fast_runs: int) -> tuple[Any, Any, list[float], list[float]]:
    """(fast's output, slow's output, fast seconds per run, slow seconds), one time of each per pair.

    After one untimed fast run (first-call costs), `pairs` times: the fast side `fast_runs` times back
    to back (their mean), then the slow side once. Both sides must be seeded (the same output each run)."""
    fast_out = fast()
    fast_s, slow_s, slow_out = [], [], None
    for _ in range(pairs):
        total = 0.0
        for _ in range(fast_runs):
            fast_out, s = timed(fast)
            total += s
        fast_s.append(total / fast_runs)
        slow_out, s = timed(slow)
        slow_s.append(s)
    return fast_out, slow_out, fast_s, slow_s


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Min, quartiles and max of the pairs' ratios: how far one pair can be from the median reported."""
    q = np.percentile(np.asarray(values, dtype=float), [0, 25, 50, 75, 100])
    return {"n": len(values), **{k: round(float(v), 3) for k, v in zip(("min", "q1", "median", "q3", "max"), q)}}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def round4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
