"""Interleaved timing shared by the CPU benchmarks.

Timing every repeat of A and then every repeat of B lets anything that drifts during the run
(the CPU's clock and temperature, another process's load, the allocator's warm caches) fall on
one side only. Taking turns, A B A B … per round, spreads that drift over both, and the median
over rounds drops a round that a burst of outside load spoiled.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

Timings = dict[str, list[list[float]]]
"""name -> one list per round of the seconds of each timed call."""


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int, steps: int = 1,
                warmup: int = 1) -> Timings:
    """Call each of ``fns`` ``warmup`` times untimed (first calls pay for lazy initialisation),
    then for each of ``rounds`` rounds time ``steps`` calls of each function in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings: Timings = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timings[name].append([_seconds(fn) for _ in range(steps)])
    return timings


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_rate(rounds: list[list[float]], work_per_call: float) -> float:
    """Median over rounds of ``work_per_call`` units per second (each round's calls pooled)."""
    return statistics.median(work_per_call * len(calls) / sum(calls) for calls in rounds)
