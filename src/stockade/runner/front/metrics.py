"""The runner's metrics, in Prometheus's own client: runs by key, status and kind, refusals,
recycles, latency and queue wait, the pool's state and the front's process. Every label
takes values from a bounded set (statuses, reasons, kinds, key names from the key file)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import stockade
from stockade.result import Status
from stockade.runner.channel import PoolStats

# Every reason a request is refused or a container replaced, defined once: the front's code
# is typed with these (mypy holds it to them), and each is a series from the start.
RejectReason = Literal["queue_full", "queue_timeout", "pool_gone", "rate_limited",
                       "too_many_waiting"]
RecycleReason = Literal["internal_error", "signaled", "not_idle", "hung_up", "draining",
                        "runs", "age"]
# How a session ended: its caller deleted it; the front ended it (idle, past its ttl, the
# runner stopping); or it was lost (a limit, its program exited, its container failed).
SessionEnd = Literal["deleted", "idle", "expired", "draining", "limit", "exited", "failed"]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
RECYCLE_REASONS: tuple[RecycleReason, ...] = get_args(RecycleReason)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# `_created` series double every counter for little use; the process start time is kept.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class PoolCollector(Collector):
    """The pool as the manager last reported it and the front holds it, read at scrape."""

    def __init__(self) -> None:
        self.stats: PoolStats | None = None
        self.idle = 0
        self.leased = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("stockade_pool_idle", "Containers idle in the front's hands.",
                                value=self.idle)
        yield GaugeMetricFamily("stockade_pool_leased", "Containers serving a run.",
                                value=self.leased)
        stats = self.stats
        if stats is None:  # the manager did not answer: no numbers rather than stale ones
            return
        yield GaugeMetricFamily("stockade_pool_size", "Containers the pool keeps warm.",
                                value=stats.size)
        yield GaugeMetricFamily("stockade_pool_starting", "Containers being created.",
                                value=stats.starting)
        yield GaugeMetricFamily("stockade_pool_warm", "1 once every container has been up.",
                                value=int(stats.warm))
        yield CounterMetricFamily("stockade_pool_recycled", "Containers destroyed and "
                                  "replaced.", value=stats.recycled)
        yield CounterMetricFamily("stockade_pool_create_failures", "Containers that "
                                  "failed to start.", value=stats.create_failures)
        yield GaugeMetricFamily("stockade_pool_last_recycle_seconds", "How long the last "
                                "replacement took, destroy to serving.",
                                value=stats.last_recycle_s)


class Metrics:
    def __init__(self, python_version: str = "unknown") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.runs = Counter("stockade_runs", "Runs finished, by key, result status and pool "
                            "kind.", ["key", "status", "kind"], registry=reg)
        self.rejected = Counter("stockade_rejected", "Requests refused before running, by "
                                "reason.", ["reason"], registry=reg)
        self.recycles = Counter("stockade_recycles", "Containers the front gave back to be "
                                "replaced, by reason.", ["reason"], registry=reg)
        self.run_seconds = Histogram("stockade_run_seconds", "Time from admission to "
                                     "result, per run.", buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_wait = Histogram("stockade_queue_wait_seconds", "Time a run waited for "
                                    "a container.", buckets=LATENCY_BUCKETS, registry=reg)
        self.sessions_ended = Counter("stockade_sessions_ended", "Sessions ended, by how.",
                                      ["reason"], registry=reg)
        self.queue_depth = 0
        self.in_flight = 0
        self.sessions = 0
        Gauge("stockade_sessions", "Sessions alive now.",
              registry=reg).set_function(lambda: self.sessions)
        Gauge("stockade_queue_depth", "Runs waiting for a container.",
              registry=reg).set_function(lambda: self.queue_depth)
        Gauge("stockade_in_flight", "Runs running now.",
              registry=reg).set_function(lambda: self.in_flight)
        Info("stockade_build", "The runner's version and the sandbox's Python.",
             registry=reg).info({"version": stockade.__version__, "python": python_version})
        ProcessCollector(namespace="stockade_front", registry=reg)
        self.pool = PoolCollector()
        reg.register(self.pool)
        for status in Status:  # every status is a series from the start, at 0
            self.runs.labels(key="anonymous", status=status.value, kind="full")
        for refused in REJECT_REASONS:
            self.rejected.labels(reason=refused)
        for recycled in RECYCLE_REASONS:
            self.recycles.labels(reason=recycled)
        for ended in get_args(SessionEnd):
            self.sessions_ended.labels(reason=ended)

    def observe_run(self, key: str, status: str, kind: str, seconds: float) -> None:
        self.runs.labels(key=key, status=status, kind=kind).inc()
        self.run_seconds.observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
