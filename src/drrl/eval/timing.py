"""Side-by-side CPU timing: every variant warmed up, then timed in interleaved rounds so that machine noise
hits all of them alike; the median over rounds of ``torch.utils.benchmark``'s per-round median."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable


def interleaved_medians(
    fns: dict[Hashable, Callable[[], object]], repeats: int, min_run_time: float = 0.2
) -> dict[Hashable, float]:
    """Seconds per call of each function of ``fns``: one warm-up call each, then ``repeats`` rounds
    (A B C ... A B C ...) of ``Timer.blocked_autorange(min_run_time)``."""
    from torch.utils.benchmark import Timer

    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median)
    return {k: statistics.median(v) for k, v in times.items()}
