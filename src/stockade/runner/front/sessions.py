"""Sessions: confined interpreters that keep their state across calls.

A session holds one container of the sessions' own pool for its life (so one-shot runs
never wait for sessions, and two sessions never share a container, a zygote or a
cgroup). Its run is the session driver, with every layer a run has. The front keeps the
session table: who owns each session, its terms, whether a call is in progress; it ends
sessions that were idle too long or reached their ttl, and remembers sessions that were
lost (a limit, exit(), a failed container, a drain) to answer `410` with the reason.

Every blocking step on a session's channel runs in this module's threads, one at a time
per session (a second request meanwhile is a `409`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from stockade import protocol, wire
from stockade.limits import Limits
from stockade.result import Result, Status
from stockade.runner import logs
from stockade.runner.channel import ChannelError
from stockade.runner.config import SESSION, SESSION_TTL_BACKSTOP_S, RunnerConfig
from stockade.runner.front import schema
from stockade.runner.front import zygote_client as client
from stockade.runner.front.metrics import SessionEnd
from stockade.runner.front.pool_client import Lease, connect_trusted
from stockade.runner.front.schema import ApiError
from stockade.runner.front.session_channel import CallResult, SessionChannel, SessionEnded
from stockade.runner.front.tenants import Tenant
from stockade.sandbox.session_driver import Caps

if TYPE_CHECKING:
    from stockade.runner.front.runs import Runs

REAP_EVERY_S = 1.0
RETRY_SESSION_S = 5  # Retry-After when a key or the host has no session to spare
LOST_REMEMBERED = 10_000  # lost sessions answered with 410 (then 404)
MACHINE_ID = Path("/etc/machine-id")
NODE = re.compile(r"[0-9a-f]{12}")
INCARNATION = re.compile(r"[0-9a-f]{8}")
T = TypeVar("T")
log = logging.getLogger(__name__)


def this_node(machine_id: Path = MACHINE_ID) -> str:
    """This host's part of a session id: the start of its machine id, which a new host
    from the same image does not share (systemd makes it at first boot). A balancer sends
    `/v1/sessions/<node>.*` to the host it names. Empty where there is no machine id."""
    try:
        node = machine_id.read_text().strip()[:12]
    except OSError:
        return ""
    return node if NODE.fullmatch(node) else ""


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass
class Session:
    id: str
    owner: str  # the key's name (or anonymous): nobody else finds this session
    lease: Lease
    channel: SessionChannel
    limits: Limits
    idle_timeout_s: float
    ttl_s: float
    cpu_total_s: float
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    busy: bool = False
    # How and why the front ended it while a call was in progress (see Sessions.end).
    ending: tuple[SessionEnd, str | None] | None = None

    def info(self) -> wire.SessionInfo:
        return wire.SessionInfo(
            id=self.id, state="running" if self.busy else "idle",
            created_at=_iso(self.created_at), expires_at=_iso(self.created_at + self.ttl_s),
            idle_timeout_s=self.idle_timeout_s, ttl_s=self.ttl_s,
            cpu_total_s=self.cpu_total_s, limits=self.limits, calls=self.calls,
            cpu_time_s=self.channel.cpu_used, memory_peak_kib=self.channel.memory_peak_kib)

    def expired(self, now: float) -> SessionEnd | None:
        """Why the session is over its terms now, if it is."""
        if now - self.started >= self.ttl_s:
            return "expired"
        if not self.busy and now - self.last_used >= self.idle_timeout_s:
            return "idle"
        return None


class Sessions:
    """The session table, bounded per host (the pool) and per caller (its quota)."""

    def __init__(self, config: RunnerConfig, runs: Runs) -> None:
        self.config = config
        self.runs = runs
        self.metrics = runs.metrics
        self.caps = Caps(config.sessions.max_outputs, config.sessions.max_output_kib << 10,
                         config.max_file_kib << 10)
        self.live: dict[str, Session] = {}
        self.starting: Counter[str] = Counter()  # sessions being started, by owner
        self.lost: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id: (owner, why)
        self.threads = ThreadPoolExecutor(max_workers=max(1, config.sessions.pool_size),
                                          thread_name_prefix="session")
        self.reaper: asyncio.Task[None] | None = None
        self.node = this_node()
        self.incarnation = secrets.token_hex(4)  # this runner's start, in every session id

    def start(self) -> None:
        self.reaper = asyncio.get_running_loop().create_task(self._reap())

    # -- the table ---------------------------------------------------------------------------

    def owned_by(self, owner: str) -> int:
        return sum(1 for s in self.live.values() if s.owner == owner)

    def find(self, owner: str, session_id: str) -> Session:
        """The caller's session: 404 if unknown (or another caller's), 410 if lost."""
        session = self.live.get(session_id)
        if session is not None and session.owner == owner:
            return session
        lost = self.lost.get(session_id)
        if lost is not None and lost[0] == owner:
            raise ApiError(410, "session_lost", f"this session ended: {lost[1]}")
        parts = session_id.split(".")  # see new_id
        node = parts[-3] if len(parts) >= 3 else ""
        incarnation = parts[-2] if len(parts) >= 2 else ""
        if NODE.fullmatch(node) and node != self.node:
            raise ApiError(410, "session_lost", "this session ended: the host that held it "
                           "was replaced or taken out of service")
        if INCARNATION.fullmatch(incarnation) and incarnation != self.incarnation:
            raise ApiError(410, "session_lost", "this session ended: its runner restarted")
        raise ApiError(404, "session_not_found", "no such session: it was never made, was "
                       "deleted, or expired")

    def new_id(self) -> str:
        """`<node>.<incarnation>.<secret>`: the host (a balancer routes on it), this runner's
        start (a restart's sessions are told from ones never made), 128 random bits."""
        return ".".join(p for p in (self.node, self.incarnation, secrets.token_hex(16)) if p)

    def _forget(self, session: Session, why: str | None) -> None:
        """Out of the table; `why` (a loss) is remembered for 410s, else it is a 404."""
        self.live.pop(session.id, None)
        self.metrics.sessions = len(self.live)
        if why is not None:
            self.lost[session.id] = (session.owner, why)
            while len(self.lost) > LOST_REMEMBERED:
                self.lost.popitem(last=False)

    # -- lifecycle -----------------------------------------------------------------------------

    async def create(self, tenant: Tenant, request: wire.SessionRequest) -> Session:
        if not self.config.sessions.pool_size:
            raise ApiError(404, "sessions_disabled", "this runner serves no sessions "
                           "(its sessions.pool_size is 0)")
        idle, ttl, cpu_total = schema.session_terms(request, self.config)
        limits = tenant.within_quota(request.limits,
                                     schema.resolve_limits(self.config, request.limits))
        allowed = tenant.quota.sessions or max(1, self.config.sessions.pool_size // 2)
        if self.owned_by(tenant.name) + self.starting[tenant.name] >= allowed:
            raise ApiError(429, "too_many_sessions", f"this key has {allowed} sessions "
                           "already; delete one (DELETE /v1/sessions/{id}) or retry later",
                           retry_after=RETRY_SESSION_S)
        tenant.spend_token()
        self.starting[tenant.name] += 1
        try:
            lease = await self._lease(tenant)
            assert lease.connection is not None
            channel = SessionChannel(lease.connection, limits, self.caps)
            terms = protocol.SessionTerms(ttl + SESSION_TTL_BACKSTOP_S, cpu_total)
            try:
                await self._in_thread(channel.open, terms)
            except SessionEnded as exc:
                self.runs.give_back(lease, exc.result)
                raise ApiError(503, "unavailable", "the session could not be started; "
                               "retry", retry_after=1) from None
        finally:
            self.starting[tenant.name] -= 1
        session = Session(self.new_id(), tenant.name, lease, channel, limits, idle, ttl,
                          cpu_total)
        self.live[session.id] = session
        self.metrics.sessions = len(self.live)
        logs.event(log, "session_started", key=tenant.name, session=session.id,
                   container=lease.name, ttl_s=ttl, idle_timeout_s=idle)
        return session

    async def _lease(self, tenant: Tenant) -> Lease:
        """A container of the sessions' pool, with its zygote's connection open."""
        try:
            lease = await asyncio.wait_for(self.runs.pool.acquire(SESSION, tenant.name),
                                           self.config.queue_timeout_s)
        except TimeoutError:
            raise ApiError(503, "sessions_full", f"all {self.config.sessions.pool_size} "
                           "session containers of this runner are in use; retry later",
                           retry_after=RETRY_SESSION_S) from None
        except ChannelError:
            raise ApiError(503, "pool_gone", "the container pool is not running",
                           retry_after=1) from None
        if lease.connection is None:
            try:
                lease.connection = connect_trusted(lease.socket_path, lease.root_uid)
            except OSError:
                self.runs.give_back(lease, None)
                raise ApiError(503, "unavailable", "the session could not be started; "
                               "retry", retry_after=1) from None
        return lease

    async def end(self, session: Session, how: SessionEnd, lost: str | None = None) -> None:
        """End a session: `lost` says why its caller lost it (410 after), None that it was
        deleted or expired (404 after). A call in progress is cancelled, and the session
        ends as that call returns."""
        if session.busy:
            session.ending = (how, lost)
            session.channel.cancel_soon()
            return
        self._forget(session, lost)
        session.busy = True  # nothing else may use its channel now
        result = await self._in_thread(session.channel.close)
        self._ended(session, result, how, cancelled=True)

    def _ended(self, session: Session, result: Result, how: SessionEnd,
               cancelled: bool = False) -> None:
        logs.event(log, "session_ended", key=session.owner, session=session.id,
                   container=session.lease.name, calls=session.calls, reason=how,
                   status=result.status)
        self.metrics.sessions_ended.labels(reason=how).inc()
        self.runs.give_back(session.lease, result, cancelled)

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, tenant: Tenant, session: Session, cell: protocol.Cell,
                   sink: client.OutputSink | None = None,
                   started: Callable[[], None] | None = None) -> wire.CellResult:
        """Run a cell. A session found gone before the cell began is a 410; one that a cell
        ends (a limit, exit()) answers this call with the record, and 410 after."""
        async with self._busy(session):
            tenant.spend_token()  # a call refused as busy costs none
            if started is not None:
                started()
            try:
                done = await self._in_thread(session.channel.call, cell, session.limits,
                                             sink)
            except SessionEnded as exc:
                if session.ending is None:  # it was gone before this call began
                    raise self._lost(session, exc.result) from None
                done = CallResult(exc.result, ended=True)  # the front ended it first
            except Exception:
                self._failed(session)
                raise
            session.calls += 1
        if done.ended:
            if session.ending is not None:  # the front ended it (cancelled the call)
                how, lost = session.ending
                self._forget(session, lost)
                self._ended(session, done.result, how, cancelled=True)
            else:
                self._lost(session, done.result)  # this call's answer says how
        record = done.result
        fields = {f: getattr(record, f) for f in record.__struct_fields__}
        return wire.CellResult(**fields, outputs=done.outputs,
                                 outputs_truncated=done.outputs_truncated,
                                 session_ended=done.ended)

    async def file(self, session: Session,
                   request: protocol.SessionRequest) -> protocol.SessionAnswer:
        async with self._busy(session):
            try:
                return await self._in_thread(session.channel.file, request)
            except SessionEnded as exc:
                raise self._lost(session, exc.result) from None
            except Exception:
                self._failed(session)
                raise

    def _failed(self, session: Session) -> None:
        """stockade itself failed on the session's channel (the request that saw it is a
        logged 500): the session is lost and its container replaced, never reused."""
        session.channel.abandon()
        self._forget(session, "its container failed (not the program's fault); start a "
                     "new session")
        assert session.channel.ended is not None
        self._ended(session, session.channel.ended, "failed")

    def _lost(self, session: Session, result: Result) -> ApiError:
        """A session that ended by itself: out of the table, remembered with why. Returns
        the 410 that says so, for a caller who has no other answer."""
        how, why = _loss(result)
        self._forget(session, why)
        self._ended(session, result, how)
        return ApiError(410, "session_lost", f"this session ended: {why}")

    @contextlib.asynccontextmanager
    async def _busy(self, session: Session) -> AsyncIterator[None]:
        if self.live.get(session.id) is not session:  # ended while the request was read
            self.find(session.owner, session.id)
        if session.busy:
            raise ApiError(409, "session_busy", "a call is in progress in this session; "
                           "retry when it has ended")
        session.busy = True
        try:
            yield
        finally:
            session.busy = False
            session.last_used = time.monotonic()

    async def _in_thread(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        # Shielded: a request that goes away must not abandon a session's channel midway.
        return await asyncio.shield(loop.run_in_executor(
            self.threads, functools.partial(function, *args)))

    # -- reaping and draining -------------------------------------------------------------------

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            now = time.monotonic()
            for session in list(self.live.values()):
                # A busy one is ended after its call, which its wall time bounds.
                why = None if session.busy else session.expired(now)
                if why is not None:
                    try:
                        await self.end(session, why)
                    except Exception:  # one session's failure must not stop the reaper
                        log.exception(f"session {session.id}: could not be ended ({why})")

    async def drain(self) -> None:
        """End every session (the runner is stopping): they are lost to their callers."""
        if self.reaper is not None:
            self.reaper.cancel()
        for session in list(self.live.values()):
            with contextlib.suppress(Exception):
                await self.end(session, "draining", "the runner was stopped (draining)")
        self.threads.shutdown(wait=False)


def _loss(result: Result) -> tuple[SessionEnd, str]:
    """How a session that ended by itself is gone, and why, as its callers are told."""
    if result.status == Status.INTERNAL_ERROR:
        return "failed", "its container failed (not the program's fault); start a new session"
    if result.status in (Status.OK, Status.RUNTIME_ERROR) and result.exit_code is not None:
        return "exited", f"its program exited with code {result.exit_code}"
    return "limit", f"{result.status}: {result.message}"
