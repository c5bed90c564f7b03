"""Shared by the benchmarks: the median wall time of a call."""

from __future__ import annotations

import statistics
import time


def median_seconds(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
