"""Prometheus text exposition of the runner's counters: no client library, no threads."""

from __future__ import annotations

import bisect
import collections

from stockade.result import Status

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter({s.value: 0 for s in Status})
        self.rejected: collections.Counter[str] = collections.Counter()
        self.recycles: collections.Counter[str] = collections.Counter()
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.queue_depth = 0
        self.in_flight = 0

    def observe_run(self, status: str, seconds: float) -> None:
        self.runs[status] += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, pool: dict[str, float]) -> str:
        lines = ["# HELP stockade_runs_total Runs finished, by result status.",
                 "# TYPE stockade_runs_total counter"]
        lines += [f'stockade_runs_total{{status="{s}"}} {n}' for s, n in sorted(self.runs.items())]
        lines += ["# HELP stockade_rejected_total Requests refused before running, by reason.",
                  "# TYPE stockade_rejected_total counter"]
        lines += [f'stockade_rejected_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.rejected.items())]
        lines += ["# HELP stockade_recycles_total Containers the front gave back to be "
                  "replaced, by reason.", "# TYPE stockade_recycles_total counter"]
        lines += [f'stockade_recycles_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.recycles.items())]
        lines += ["# HELP stockade_run_seconds Time from admission to result, per run.",
                  "# TYPE stockade_run_seconds histogram"]
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'stockade_run_seconds_bucket{{le="{le}"}} {cumulative}')
        lines += [f"stockade_run_seconds_sum {self.latency_sum:.6f}",
                  f"stockade_run_seconds_count {self.latency_count}"]
        gauges = {"queue_depth": self.queue_depth, "in_flight": self.in_flight, **pool}
        for name, value in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE stockade_{name} {kind}", f"stockade_{name} {value:g}"]
        return "\n".join(lines) + "\n"
