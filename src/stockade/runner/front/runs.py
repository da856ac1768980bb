"""Admission and dispatch of one-shot runs: each caller within its quota, callers in turn
for a container, a bounded wait; then the leased container's zygote, over the connection
the lease keeps; then the container back to its pool once its zygote proves the run gone,
or replaced."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stockade.limits import Limits
from stockade.result import Result, Status
from stockade.runner import logs
from stockade.runner.channel import ChannelError
from stockade.runner.config import RunnerConfig, kind_for
from stockade.runner.front import streaming
from stockade.runner.front import zygote_client as client
from stockade.runner.front.metrics import Metrics, RecycleReason, RejectReason
from stockade.runner.front.pool_client import Lease, PoolClient, connect_trusted
from stockade.runner.front.schema import ApiError
from stockade.runner.front.tenants import Tenant

RETRY_AFTER_S = 1
# How long a zygote may take to prove a finished run gone (its own reap waits up to 5 s).
IDLE_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


def _run_on(lease: Lease, job: client.Job, limits: Limits, outputs: client.OutputCaps, *,
            sink: client.OutputSink | None) -> Result:
    """In a worker thread: one run on the leased container's zygote, over the connection
    the lease keeps open between runs (a zygote serves one connection at a time)."""
    if lease.connection is None:
        try:
            lease.connection = connect_trusted(lease.socket_path, lease.root_uid)
        except OSError as exc:
            return client.internal_error(f"cannot reach the container's zygote: {exc}")
    return client.run(lease.connection, job, limits, outputs, sink)


def retire_reason(config: RunnerConfig, lease: Lease, result: Result | None,
                  cancelled: bool = False) -> RecycleReason | None:
    """Why the container that gave `result` (None: no result at all) must not serve again,
    if it must not. A program that failed, hit a limit or was cancelled is no such reason:
    its zygote proves every run gone before it says Idle, and exits when it cannot."""
    if result is None or result.status == Status.INTERNAL_ERROR or lease.connection is None:
        return "internal_error"
    # A signal the zygote did not send (for a cancel the front asked) is someone else's.
    if result.status == Status.SIGNALED and not cancelled:
        return "signaled"
    if lease.runs >= config.recycle_after_runs:
        return "runs"
    if time.monotonic() - lease.since >= config.recycle_after_s:
        return "age"
    return None


@dataclass(frozen=True)
class RunContext:
    """What the run's log line says about who asked, and where."""

    request_id: str
    route: str
    events: streaming.RunEvents | None = None  # the client streams this run's output


class Runs:
    """Admission control and dispatch: each caller within its quota, callers in turn for a
    container, a bounded wait; then the container's zygote."""

    def __init__(self, config: RunnerConfig, pool: PoolClient, metrics: Metrics) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.threads = ThreadPoolExecutor(max_workers=config.containers,
                                          thread_name_prefix="run")
        self.outputs = client.OutputCaps(config.max_out_files, config.max_out_kib << 10)
        self.idle = asyncio.Event()
        self.idle.set()

    def _count_refusal(self, reason: RejectReason) -> None:
        self.metrics.rejected.labels(reason=reason).inc()

    def _refused(self, status: int, reason: RejectReason, message: str) -> ApiError:
        self._count_refusal(reason)
        return ApiError(status, "saturated" if status == 503 else reason, message,
                        retry_after=RETRY_AFTER_S)

    def _admission_check(self, tenant: Tenant) -> None:
        """Room for one more waiting run, in all (else the service is overloaded: 503) and
        for this caller (else it is the caller's limit: 429); then the caller's rate."""
        if self.metrics.queue_depth >= self.config.wait_queue:
            raise self._refused(503, "queue_full", "every container is busy and the wait "
                                f"queue ({self.config.wait_queue}) is full; retry later")
        if tenant.waiting >= tenant.queue:
            raise self._refused(429, "too_many_waiting", f"{tenant.queue} runs of this key "
                                "are waiting for a container already; retry later")
        try:
            tenant.spend_token()
        except ApiError:
            self._count_refusal("rate_limited")
            raise

    async def execute(self, job: client.Job, limits: Limits, tenant: Tenant,
                      context: RunContext, environment: str) -> Result:
        sources = [job.code, *(f.content.decode("utf-8", "replace") for f in job.files
                               if f.name.endswith(".py"))]
        kind = kind_for(self.config, environment, sources)
        self._admission_check(tenant)
        started = time.monotonic()
        self.metrics.queue_depth += 1
        tenant.waiting += 1
        try:
            lease = await asyncio.wait_for(self._admit(kind, tenant),
                                           self.config.queue_timeout_s)
        except TimeoutError:
            raise self._refused(503, "queue_timeout", "no container became free within "
                                f"{self.config.queue_timeout_s} s; retry later") from None
        except ChannelError:
            raise self._refused(503, "pool_gone", "the container pool is not running") \
                from None
        finally:
            self.metrics.queue_depth -= 1
            tenant.waiting -= 1
        waited = time.monotonic() - started
        self.metrics.queue_wait.observe(waited)
        self.metrics.in_flight += 1
        self.idle.clear()
        events = context.events
        if events is not None:
            events.started()
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.threads, functools.partial(
            _run_on, lease, job, limits, self.outputs,
            sink=events.output if events else None))
        # The container goes back when its run has ended in its thread, not when this
        # request does: a cancelled request must not close a connection still in use.
        running.add_done_callback(lambda done: self._ended(lease, tenant, done))
        result = await asyncio.shield(running)
        elapsed = time.monotonic() - started
        self.metrics.observe_run(tenant.name, result.status, lease.kind, elapsed)
        logs.event(log, "run", request_id=context.request_id, key=tenant.name,
                   route=context.route, status=result.status, cpu_time_s=result.cpu_time_s,
                   wall_time_s=result.wall_time_s, memory_peak_kib=result.memory_peak_kib,
                   container=lease.name, kind=lease.kind, queue_wait_s=round(waited, 6),
                   total_s=round(elapsed, 6))
        return result

    async def _admit(self, kind: str, tenant: Tenant) -> Lease:
        """One of the caller's run slots, then a container in the caller's turn."""
        await tenant.running.acquire()
        try:
            return await self._acquire_live(kind, tenant.name)
        except BaseException:
            tenant.running.release()
            raise

    async def _acquire_live(self, kind: str, caller: str) -> Lease:
        """A container whose zygote is still there. A lease comes back only after its
        zygote's Idle, so one that hung up since (its container was stopped) is all this
        catches: it goes back to be replaced, and the next is taken."""
        while True:
            lease = await self.pool.acquire(kind, caller)
            if not lease.hung_up():
                return lease
            self._recycle(lease, "hung_up")

    def _ended(self, lease: Lease, tenant: Tenant, done: asyncio.Future[Result]) -> None:
        tenant.running.release()
        self.metrics.in_flight -= 1
        if self.metrics.in_flight == 0:
            self.idle.set()
        result = None if done.cancelled() or done.exception() is not None else done.result()
        self.give_back(lease, result)

    def give_back(self, lease: Lease, result: Result | None, cancelled: bool = False) -> None:
        """A container whose run (or session) ended with `result` goes back to its pool
        once its zygote proves the run gone, or is replaced (see `retire_reason`);
        `cancelled`: the front itself ended it."""
        lease.runs += 1
        reason = retire_reason(self.config, lease, result, cancelled)
        if reason is None and lease.connection is not None:
            try:
                waiting = asyncio.get_running_loop().run_in_executor(
                    self.threads, client.await_idle, lease.connection, IDLE_TIMEOUT_S)
            except RuntimeError:  # draining: the threads are gone
                reason = "draining"
            else:
                waiting.add_done_callback(lambda idle: self._idle(lease, idle))
                return
        self._recycle(lease, reason or "internal_error")

    def _idle(self, lease: Lease, idle: asyncio.Future[bool]) -> None:
        if not idle.cancelled() and idle.exception() is None and idle.result():
            self.pool.release(lease)
        else:
            self._recycle(lease, "not_idle")

    def _recycle(self, lease: Lease, reason: RecycleReason) -> None:
        logs.event(log, "container_recycled", f"replacing {lease.name} after {lease.runs} "
                   f"runs: {reason}", level=logging.INFO if reason in {"runs", "age"} else
                   logging.WARNING, container=lease.name, kind=lease.kind, runs=lease.runs,
                   reason=reason)
        self.metrics.recycles.labels(reason=reason).inc()
        self.pool.release(lease, dirty=reason)

    async def drain(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        self.threads.shutdown(wait=False)
        return self.idle.is_set()
