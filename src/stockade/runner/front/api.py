"""The HTTP front's handlers, one a row of the route table (`routes.py`): identify the
caller, validate, hand the run to `runs.py` (or a session to `sessions.py`), answer; and
the middleware that gives every answer its request id and every error the documented shape.

It runs as the unprivileged runner user. Its only ways out are the pool channel and the
zygote sockets the pool leases to it; bad input never reaches either, and never gets a 500.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from stockade import protocol, wire
from stockade.result import Result, Status
from stockade.runner import logs
from stockade.runner.channel import ChannelError, PoolStats
from stockade.runner.config import SESSION, RunnerConfig
from stockade.runner.front import metrics, openapi, piston, routes, schema, streaming
from stockade.runner.front.environments import Catalogue
from stockade.runner.front.pages import Pages
from stockade.runner.front.runs import RETRY_AFTER_S, RunContext, Runs
from stockade.runner.front.schema import ApiError
from stockade.runner.front.sessions import Session, Sessions
from stockade.runner.front.tenants import Tenant, Tenants

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONFIG = web.AppKey("config", RunnerConfig)  # what the middleware reads of the config
R = TypeVar("R", bound=Result)
log = logging.getLogger(__name__)


def _public(result: R, request_id: str) -> R:
    """stockade's own failure is logged in full; the client gets a short message and the
    request id, never the internals."""
    if result.status != Status.INTERNAL_ERROR:
        return result
    log.error(f"request {request_id}: internal error: {result.message}")
    return msgspec.structs.replace(result, message=(
        f"stockade failed to run this (not the program's fault); request id {request_id}"))


async def _stream(request: web.Request, events: streaming.RunEvents,
                  run: Awaitable[Result]) -> web.StreamResponse:
    # The middleware's header would come too late: a stream's headers leave first.
    return await events.send(request, run, {"X-Request-Id": request["request_id"]})


FILE_ERRORS = {"not_found": (404, "file_not_found"), "not_a_file": (422, "not_a_file"),
               "too_large": (422, "file_too_large"), "invalid": (422, "invalid_file")}
A = TypeVar("A")


def _expect(answer: protocol.SessionAnswer, kind: type[A]) -> A:
    """The session's answer to a file operation as the kind asked for, or its refusal."""
    if isinstance(answer, kind):
        return answer
    if isinstance(answer, protocol.OpFailed):
        status, code = FILE_ERRORS[answer.reason]
        raise ApiError(status, code, answer.message, "path")
    raise ApiError(502, "session_broken", "the session answered wrongly (its program may "
                   "have written over its channel to stockade); delete it and start another")


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


def _route(request: web.Request) -> routes.Route | None:
    """The table's row of the route the request matched, if it matched one."""
    resource = request.match_info.route.resource
    return routes.find(request.method, resource.canonical) if resource else None


def _shape(request: web.Request) -> routes.Shape:
    """The error body a request gets: its route's (an unknown path under Piston's prefix
    gets Piston's)."""
    route = _route(request)
    if route is not None:
        return route.shape
    return "piston" if request.path.startswith("/api/v2/") else "native"


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
            f"the body is over the {request.app[CONFIG].max_body_kib} KiB cap")
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
    if _shape(request) == "piston":
        return _json(piston.PistonError(error.message, request["request_id"]), error.status,
                     headers)
    detail = wire.ErrorDetail(error.code, error.message, error.field, request["request_id"])
    return _json(wire.ErrorBody(detail), error.status, headers)


class Api:
    def __init__(self, config: RunnerConfig, runs: Runs, tenants: Tenants,
                 catalogue: Catalogue, pages: Pages, *, sessions: Sessions) -> None:
        self.config = config
        self.pages = pages
        self.runs = runs
        self.sessions = sessions
        self.pool = runs.pool
        self.metrics = runs.metrics
        self.tenants = tenants
        self.catalogue = catalogue

    def app(self) -> web.Application:
        app = web.Application(middlewares=[request_ids, errors],
                              client_max_size=self.config.max_body_kib * 1024)
        app[CONFIG] = self.config
        app.add_routes([*(web.route(r.method, r.server_path, getattr(self, r.handler))
                          for r in routes.ROUTES), *self.pages.routes()])
        return app

    async def _caller(self, request: web.Request) -> Tenant:
        """The key the request presents (or the anonymous caller), allowed the scope its
        route needs (routes.py)."""
        route = _route(request)
        if route is None or route.scope is None:
            raise RuntimeError(f"{request.method} {request.path} is no keyed route")
        tenant = await self.tenants.identify(request.headers.get("Authorization"))
        tenant.check_scope(route.scope)
        return tenant

    async def _execute(self, http: web.Request, tenant: Tenant, request: wire.RunRequest,
                       events: streaming.RunEvents | None = None) -> Result:
        """Every run route's one path: the typed request becomes a job within the caller's
        quota, then a result (see `_public`)."""
        env = self.catalogue.choose(request.environment)
        job, limits = schema.to_job(request, self.config)
        limits = tenant.within_quota(request.limits, limits)
        result = await self.runs.execute(job, limits, tenant,
                                         RunContext(http["request_id"], http.path, events),
                                         env.name)
        return _public(result, http["request_id"])

    async def post_run(self, request: web.Request) -> web.StreamResponse:
        tenant = await self._caller(request)
        body = schema.decode(await request.read(), wire.RunRequest)  # language included
        if not streaming.wanted(request):
            return _json(await self._execute(request, tenant, body))
        events = streaming.RunEvents(asyncio.get_running_loop())
        return await _stream(request, events, self._execute(request, tenant, body, events))

    # -- sessions ----------------------------------------------------------------------------

    async def _session(self, request: web.Request) -> tuple[Tenant, Session]:
        tenant = await self._caller(request)
        return tenant, self.sessions.find(tenant.name, request.match_info["id"])

    async def post_session(self, request: web.Request) -> web.Response:
        tenant = await self._caller(request)
        body = schema.decode(await request.read() or b"{}", wire.SessionRequest)
        session = await self.sessions.create(tenant, body)
        return _json(session.info(), 201, {"Location": f"/v1/sessions/{session.id}"})

    async def list_sessions(self, request: web.Request) -> web.Response:
        tenant = await self._caller(request)
        return _json(wire.SessionList([s.info() for s in self.sessions.live.values()
                                         if s.owner == tenant.name]))

    async def get_session(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        return _json(session.info())

    async def delete_session(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        await self.sessions.end(session, "deleted")
        return web.Response(status=204)

    async def post_session_run(self, request: web.Request) -> web.StreamResponse:
        tenant, session = await self._session(request)
        body = schema.decode(await request.read(), wire.CellRequest)
        cell = protocol.Cell(body.code, body.stdin)
        if not streaming.wanted(request):
            return _json(await self._session_call(request, tenant, session, cell))
        events = streaming.RunEvents(asyncio.get_running_loop())
        return await _stream(request, events,
                             self._session_call(request, tenant, session, cell, events))

    async def _session_call(self, http: web.Request, tenant: Tenant, session: Session,
                            cell: protocol.Cell,
                            events: streaming.RunEvents | None = None) -> wire.CellResult:
        started = time.monotonic()
        result = await self.sessions.call(tenant, session, cell,
                                          events.output if events else None,
                                          events.started if events else None)
        elapsed = time.monotonic() - started
        self.metrics.observe_run(tenant.name, result.status, SESSION, elapsed)
        logs.event(log, "run", request_id=http["request_id"], key=tenant.name,
                   route="/v1/sessions/{id}/runs", session=session.id, status=result.status,
                   cpu_time_s=result.cpu_time_s, wall_time_s=result.wall_time_s,
                   memory_peak_kib=result.memory_peak_kib, container=session.lease.name,
                   kind=SESSION, total_s=round(elapsed, 6))
        return _public(result, http["request_id"])

    async def list_session_files(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        answer = await self.sessions.file(session, protocol.FileList())
        listing = _expect(answer, protocol.FileEntries)
        return _json(wire.SessionFiles(listing.files, listing.truncated))

    async def put_session_file(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        path = schema.session_file_name(request.match_info["path"])
        content = await request.read()
        cap = self.config.max_file_kib << 10
        if len(content) > cap:
            raise ApiError(422, "file_too_large", f"a session's file may be at most "
                           f"{cap >> 10} KiB", "body")
        _expect(await self.sessions.file(session, protocol.FilePut(path, content)),
                protocol.OpDone)
        return web.Response(status=204)

    async def get_session_file(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        path = schema.session_file_name(request.match_info["path"])
        answer = _expect(await self.sessions.file(session, protocol.FileGet(path)),
                         protocol.FileData)
        return web.Response(body=answer.content, content_type="application/octet-stream")

    async def delete_session_file(self, request: web.Request) -> web.Response:
        _, session = await self._session(request)
        path = schema.session_file_name(request.match_info["path"])
        _expect(await self.sessions.file(session, protocol.FileDelete(path)), protocol.OpDone)
        return web.Response(status=204)

    def _language(self) -> wire.Language:
        default = self.catalogue.default
        return wire.Language(name=wire.LANGUAGE, version=default.version,
                               aliases=wire.ALIASES, preloaded=default.preloaded)

    async def get_languages(self, _request: web.Request) -> web.Response:
        return _json(wire.Languages([self._language()], self.config.limits))

    async def get_environments(self, _request: web.Request) -> web.Response:
        return _json(self.catalogue.listing())

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
        await self._caller(request)
        self.metrics.pool.stats = await self._pool_stats()
        self.metrics.pool.idle, self.metrics.pool.leased = self.pool.idle_count, self.pool.leased
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def get_openapi(self, _request: web.Request) -> web.Response:
        return _json(openapi.document(self.config))

    # -- Piston v2 ---------------------------------------------------------------------------

    async def piston_runtimes(self, _request: web.Request) -> web.Response:
        return _json([piston.PistonRuntime(wire.LANGUAGE, env.version, wire.ALIASES,
                                           env.name) for env in self.catalogue.infos])

    async def piston_execute(self, request: web.Request) -> web.Response:
        tenant = await self._caller(request)
        body = schema.decode(await request.read(), piston.PistonRequest)
        run = piston.to_run_request(body, self.catalogue)
        result = await self._execute(request, tenant, run)
        return _json(piston.to_response(result, self.catalogue.choose(run.environment).version))
