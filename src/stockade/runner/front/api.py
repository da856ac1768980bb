"""The HTTP front: validate, admit, dispatch to a leased container's zygote, answer.

It runs as the unprivileged runner user. Its only ways out are the pool channel and the
zygote sockets the pool leases to it; bad input never reaches either, and never gets a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from stockade.limits import Limits
from stockade.result import Result, Status
from stockade.runner import logs
from stockade.runner.channel import ChannelError, PoolStats
from stockade.runner.config import RunnerConfig, kind_for
from stockade.runner.front import metrics, openapi, piston, schema, streaming
from stockade.runner.front.metrics import Metrics, RecycleReason, RejectReason
from stockade.runner.front.pages import Pages
from stockade.runner.front.pool_client import Lease, PoolClient, connect_trusted
from stockade.runner.front.schema import ApiError
from stockade.runner.front.tenants import Tenant, Tenants
from stockade.sandbox import client

RETRY_AFTER_S = 1
# How long a zygote may take to prove a finished run gone (its own reap waits up to 5 s).
IDLE_TIMEOUT_S = 10.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)


def _run_on(lease: Lease, owner_uid: int, job: client.Job, limits: Limits,
            outputs: client.OutputCaps, *, sink: client.OutputSink | None) -> Result:
    """In a worker thread: one run on the leased container's zygote, over the connection
    the lease keeps open between runs (a zygote serves one connection at a time)."""
    if lease.connection is None:
        try:
            lease.connection = connect_trusted(lease.socket_path, owner_uid)
        except OSError as exc:
            return client.internal_error(f"cannot reach the container's zygote: {exc}")
    return client.run(lease.connection, job, limits, outputs, sink)


def retire_reason(config: RunnerConfig, lease: Lease,
                  result: Result | None) -> RecycleReason | None:
    """Why the container that gave `result` (None: no result at all) must not serve again,
    if it must not. A program that failed, hit a limit or was cancelled is no such reason:
    its zygote proves every run gone before it says Idle, and exits when it cannot."""
    if result is None or result.status == Status.INTERNAL_ERROR or lease.connection is None:
        return "internal_error"
    if result.status == Status.SIGNALED:  # a signal the zygote did not send: someone else's
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
                      context: RunContext) -> Result:
        sources = [job.code, *(f.content.decode("utf-8", "replace") for f in job.files
                               if f.name.endswith(".py"))]
        kind = kind_for(self.config, sources)
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
            _run_on, lease, self.config.idmap_base, job, limits, self.outputs,
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
        lease.runs += 1
        result = None if done.cancelled() or done.exception() is not None else done.result()
        reason = retire_reason(self.config, lease, result)
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


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), status=status,
                        content_type="application/json", headers=headers)


HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer carries an X-Request-Id: the client's, when it is a sane one, else
    a new one. Error bodies and the log name it, so a user's report can be found."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if schema.REQUEST_ID.fullmatch(given) else secrets.token_hex(12)
    request["request_id"] = request_id
    response = await handler(request)
    response.headers["X-Request-Id"] = request_id
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the documented error shape (Piston's on Piston's routes)."""
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 413 else (
            f"the body is over the {request.app['config'].max_body_kib} KiB cap")
        error = ApiError(exc.status, HTTP_ERROR_CODES.get(exc.status, "http_error"), message)
    except Exception:
        log.exception(f"request {request['request_id']}: internal error on {request.method} "
                      f"{request.path}")
        error = ApiError(500, "internal_error", "stockade failed; the runner's log has the "
                         "detail under this request id")
    headers = {}
    if error.status in {429, 503}:
        headers["Retry-After"] = str(error.retry_after or RETRY_AFTER_S)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="stockade"'
    if request.path.startswith("/api/v2/"):
        return _json(piston.PistonError(error.message, request["request_id"]), error.status,
                     headers)
    detail = schema.ErrorDetail(error.code, error.message, error.field, request["request_id"])
    return _json(schema.ErrorBody(detail), error.status, headers)


class Api:
    def __init__(self, config: RunnerConfig, runs: Runs, tenants: Tenants,
                 python_version: str, pages: Pages) -> None:
        self.config = config
        self.pages = pages
        self.runs = runs
        self.pool = runs.pool
        self.metrics = runs.metrics
        self.tenants = tenants
        self.python_version = python_version

    def app(self) -> web.Application:
        app = web.Application(middlewares=[request_ids, errors],
                              client_max_size=self.config.max_body_kib * 1024)
        app["config"] = self.config
        app.add_routes([
            web.post("/v1/runs", self.post_run),
            web.get("/v1/languages", self.get_languages),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.get_metrics),
            web.get("/openapi.json", self.get_openapi),
            web.get("/api/v2/runtimes", self.piston_runtimes),
            web.post("/api/v2/execute", self.piston_execute),
            *self.pages.routes(),
        ])
        return app

    async def _caller(self, request: web.Request, scope: str) -> Tenant:
        """The key the request presents (or the anonymous caller), allowed `scope`."""
        tenant = await self.tenants.identify(request.headers.get("Authorization"))
        tenant.check_scope(scope)
        return tenant

    async def _execute(self, http: web.Request, tenant: Tenant, request: schema.RunRequest,
                       events: streaming.RunEvents | None = None) -> Result:
        """Every run route's one path: the typed request becomes a job within the caller's
        quota, then a result. stockade's own failure is logged in full; the client gets a
        short message and the request id, never the internals."""
        job, limits = schema.to_job(request, self.config)
        limits = tenant.within_quota(request.limits, limits)
        request_id = http["request_id"]
        result = await self.runs.execute(job, limits, tenant,
                                         RunContext(request_id, http.path, events))
        if result.status == Status.INTERNAL_ERROR:
            log.error(f"request {request_id}: internal error: {result.message}")
            result = msgspec.structs.replace(result, message=(
                f"stockade failed to run this (not the program's fault); request id "
                f"{request_id}"))
        return result

    async def post_run(self, request: web.Request) -> web.StreamResponse:
        tenant = await self._caller(request, "runs")
        body = schema.decode(await request.read(), schema.RunRequest)  # language included
        if not streaming.wanted(request):
            return _json(await self._execute(request, tenant, body))
        events = streaming.RunEvents(asyncio.get_running_loop())
        # The middleware's header would come too late: a stream's headers leave first.
        return await events.send(request, self._execute(request, tenant, body, events),
                                 {"X-Request-Id": request["request_id"]})

    def _language(self) -> schema.Language:
        return schema.Language(name=schema.LANGUAGE, version=self.python_version,
                               aliases=schema.ALIASES, preloaded=self.config.preload)

    async def get_languages(self, _request: web.Request) -> web.Response:
        return _json(schema.Languages([self._language()], self.config.limits))

    async def healthz(self, _request: web.Request) -> web.Response:
        if self.pool.closed.done():
            raise ApiError(503, "unavailable", "the container pool is not running")
        return _json({"status": "ok"})

    async def _pool_stats(self) -> PoolStats | None:
        """The manager's counters, or None when it does not answer within 2 s."""
        try:
            return await asyncio.wait_for(self.pool.stats(), 2.0)
        except (TimeoutError, ChannelError):
            return None

    async def readyz(self, _request: web.Request) -> web.Response:
        stats = await self._pool_stats()
        if stats is None:
            raise ApiError(503, "unavailable", "the container pool does not answer")
        live = self.pool.idle_count + self.pool.leased
        if not stats.warm:
            raise ApiError(503, "warming_up", f"{live} of {stats.size} containers are up")
        if stats.failing or live + stats.starting == 0:
            raise ApiError(503, "pool_failing", "containers cannot be started; the runner's "
                           "log says why")
        return _json({"status": "ready", "containers": live, "size": stats.size})

    async def get_metrics(self, request: web.Request) -> web.Response:
        await self._caller(request, "metrics")
        self.metrics.pool.stats = await self._pool_stats()
        self.metrics.pool.idle, self.metrics.pool.leased = self.pool.idle_count, self.pool.leased
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def get_openapi(self, _request: web.Request) -> web.Response:
        return _json(openapi.document(self.config))

    # -- Piston v2 ---------------------------------------------------------------------------

    async def piston_runtimes(self, _request: web.Request) -> web.Response:
        return _json([piston.PistonRuntime(schema.LANGUAGE, self.python_version,
                                           schema.ALIASES)])

    async def piston_execute(self, request: web.Request) -> web.Response:
        tenant = await self._caller(request, "runs")
        body = schema.decode(await request.read(), piston.PistonRequest)
        result = await self._execute(request, tenant,
                                     piston.to_run_request(body, self.python_version))
        return _json(piston.to_response(result, self.python_version))
