"""Side-by-side timing for the measuring scripts: this machine is shared and noisy, so runs are interleaved."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable):
    """(fn's result, seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def alternate(runs: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Time each named run `repeats` times, rotating the order every round so noise hits all alike."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timed(runs[n])[1])
    return times
