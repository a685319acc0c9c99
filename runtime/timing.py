"""Median latency of several calls timed side by side: the one timing loop of the benchmark scripts
and of the calibration report."""

from __future__ import annotations

import statistics
import time


def median_times(calls: dict, rounds: int, warmup: int = 3, pause_s: float = 0.0) -> dict[str, float]:
    """Median seconds of each call in ``calls`` (name -> function), over ``rounds`` rounds.

    Interleaved, and the order rotates every round: drift, and a thread pool still spinning from
    the call before, hit every call alike. ``pause_s``: idle time before each timed call (ONNX
    Runtime's CPU thread pools spin for a while after a call and slow whichever runs next)."""
    for _ in range(warmup):  # engine selection, allocator growth, autotuning
        for f in calls.values():
            f()
    names = list(calls)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(pause_s)
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
