"""Is a measure growing with the runs, or did it just move once? The soak's judge.

A leak grows with the work done: over samples taken after warm-up (at least MIN_SAMPLES),
its least-squares slope per 1,000 runs is over the measure's threshold, the median of the
last third of the samples is above the first third's, and it stays so with its largest
single jump taken out. A one-time step (a descriptor opened lazily, a cache filled once)
is one jump: taken out, nothing is left. A decrease is never a trend.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

MIN_SAMPLES = 10


def slope_per_1000(runs: Sequence[float], values: Sequence[float]) -> float:
    """The least-squares slope of `values` against `runs`, per 1,000 runs."""
    mean_x, mean_y = statistics.fmean(runs), statistics.fmean(values)
    spread = sum((x - mean_x) ** 2 for x in runs)
    if spread == 0:
        return 0.0
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(runs, values,
                                                                  strict=True)) / spread


def _thirds_rise(values: Sequence[float]) -> float:
    third = len(values) // 3
    return statistics.median(values[-third:]) - statistics.median(values[:third])


def _without_largest_jump(values: Sequence[float]) -> list[float]:
    jumps = [b - a for a, b in itertools.pairwise(values)]
    at = max(range(len(jumps)), key=jumps.__getitem__)
    return [v - (jumps[at] if i > at else 0) for i, v in enumerate(values)]


def growing(runs: Sequence[float], values: Sequence[float], threshold: float) -> bool:
    """Whether `values` (sampled after `runs` runs each) grow by more than `threshold`
    per 1,000 runs, and not by one step."""
    if len(values) != len(runs) or len(values) < MIN_SAMPLES:
        raise ValueError(f"a trend needs at least {MIN_SAMPLES} samples, each with its "
                         f"run count (got {len(values)} and {len(runs)})")
    for series in (list(values), _without_largest_jump(values)):
        if slope_per_1000(runs, series) <= threshold or _thirds_rise(series) <= 0:
            return False
    return True


def describe(name: str, runs: Sequence[float], values: Sequence[float]) -> str:
    return (f"{name}: {values[0]:g} -> {values[-1]:g} over {runs[-1] - runs[0]:.0f} runs "
            f"({slope_per_1000(runs, values):+.2f} per 1,000 runs; samples "
            f"{', '.join(f'{v:g}' for v in values)})")
