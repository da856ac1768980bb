"""Who is asking, and whether they may: keys checked, quotas held, before anything runs.

A caller is a key (or the anonymous callers together, where the config allows them). Each
has a rate (a token bucket), a number of runs at once and a share of the wait queue; the
front's admission serves callers' waiting runs in turn, so one caller's flood delays
another's run by about one run, not by the flood.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from stockade.limits import FIELDS, Limits, LimitsIn
from stockade.runner.config import RunnerConfig
from stockade.runner.front.schema import ApiError
from stockade.runner.keys import KEY, KeyRing, Quota

ANONYMOUS = "anonymous"


@dataclass
class Tenant:
    """One caller's live state: its rate bucket, runs running and runs waiting."""

    name: str
    quota: Quota
    concurrency: int
    queue: int
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)
    running: asyncio.Semaphore = field(init=False)
    waiting: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.running = asyncio.Semaphore(self.concurrency)

    @property
    def burst(self) -> float:
        return max(1.0, self.quota.runs_per_minute / 6)

    def spend_token(self) -> None:
        """A run may start: a token is spent. Else a 429 that says when one will be there."""
        now = time.monotonic()
        rate = self.quota.runs_per_minute / 60
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            return
        raise ApiError(429, "rate_limited", f"over this key's {self.quota.runs_per_minute} "
                       "runs per minute; retry after Retry-After seconds",
                       retry_after=math.ceil((1 - self.tokens) / rate))

    def check_scope(self, scope: str) -> None:
        if scope not in self.quota.scopes:
            raise ApiError(403, "scope_not_allowed", f"this key may not use {scope}; its "
                           f"scopes are {', '.join(self.quota.scopes)}")

    def within_quota(self, requested: LimitsIn | None, limits: Limits) -> Limits:
        """`limits` (already within the runner's caps) within this caller's own maximum:
        a limit the request named over it is a 403; a default over it is lowered to it."""
        lowered = {}
        for item in FIELDS:
            cap = getattr(self.quota.maximum, item.name)
            if cap is None or getattr(limits, item.name) <= cap:
                continue
            if getattr(requested, item.name, None) is not None:
                raise ApiError(403, "limit_not_allowed", f"{item.name} may be at most "
                               f"{cap}{item.unit} with this key", f"limits.{item.name}")
            lowered[item.name] = cap
        return Limits(**{**{f.name: getattr(limits, f.name) for f in FIELDS}, **lowered})


class Tenants:
    """Callers by name: a key presented in a header becomes its tenant, or a 401."""

    def __init__(self, config: RunnerConfig, ring: KeyRing) -> None:
        self.config = config
        self.ring = ring
        self.live: dict[str, Tenant] = {}

    def _tenant(self, name: str, quota: Quota) -> Tenant:
        tenant = self.live.get(name)
        if tenant is None or tenant.quota != quota:  # new, or its quota changed
            concurrency = quota.concurrency or self.config.containers
            queue = quota.queue or max(1, self.config.wait_queue // 2)
            tenant = self.live[name] = Tenant(name, quota, concurrency, queue)
        return tenant

    async def identify(self, authorization: str | None) -> Tenant:
        if authorization is None:
            if self.config.anonymous is None:
                raise ApiError(401, "key_required", "this runner needs an API key: send "
                               "`Authorization: Bearer <key>` (operators make keys with "
                               "`stockade keys add NAME`)")
            return self._tenant(ANONYMOUS, self.config.anonymous)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":  # schemes are case-insensitive (RFC 9110)
            raise ApiError(401, "invalid_key", "the Authorization header must be "
                           "`Bearer <key>`")
        key = key.strip()
        self.ring.maybe_reload(now_please=KEY.fullmatch(key) is not None
                               and self.ring.known(key) is None)
        record = self.ring.cached(key)
        if record is None and self.ring.known(key) is not None:
            record = await asyncio.get_running_loop().run_in_executor(
                None, self.ring.verify, key)
        if record is None:
            raise ApiError(401, "invalid_key", "this API key is not valid (mistyped, or "
                           "revoked)")
        return self._tenant(record.name, record.quota)
