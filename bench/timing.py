"""Shared by the benchmarks: the median wall time of a call, a process's CPU time."""

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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (its own, not its children's)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
