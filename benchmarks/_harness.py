"""Timing protocol shared by the benchmarks (DESIGN.md, "Testing").

A figure is only ever reported beside a baseline measured in the same run, at
the same thread count, interleaved with the thing measured, best of several,
with preallocated outputs on both sides: this machine is shared and noisy, so
ratios hold where absolute times do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["interleaved_best", "copy_baseline"]


def interleaved_best(fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Best wall time in seconds of each function, calls interleaved round by round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def copy_baseline(x: torch.Tensor) -> Callable[[], object]:
    """A plain tensor copy of ``x`` into a preallocated tensor: the memory-speed yardstick."""
    out = torch.empty_like(x)
    return lambda: out.copy_(x)
