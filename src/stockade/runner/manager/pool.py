"""The privileged pool manager: keeps warm containers of each kind (per environment, a lean
one preloading the standard library and a full one preloading what the environment names,
numpy and pandas; sessions' apart), hands each to the front as soon as its zygote serves,
and replaces every container the front hands back dirty.

It runs as root (LXC, cgroups) and does nothing else: no HTTP, no request parsing. It
trusts nothing the front says beyond the channel's schema: a recycle of a container it
did not hand over is ignored, and if the front goes away every container is destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stockade.runner import channel, logs
from stockade.runner.config import Kind, RunnerConfig, kinds
from stockade.runner.manager.containers import ContainerError, Containers

RETRY_DELAY_S = 1.0  # after a failed create, before the next attempt; doubles up to
MAX_RETRY_DELAY_S = 30.0
log = logging.getLogger(__name__)


class Pool:
    """The containers of one kind."""

    def __init__(self, kind: Kind, containers: Containers, lxc: ThreadPoolExecutor,
                 announce: Callable[[Pool, str], None]) -> None:
        self.kind = kind
        self.size = kind.size
        self.containers = containers
        self.lxc = lxc
        self.announce = announce
        prefix = containers.config.container_prefix
        self.names = (f"{prefix}{kind.name}-{n:05d}" for n in itertools.count(1))
        self.live: set[str] = set()  # handed to the front
        # Starts a stop cut short: their LXC call may still run; close() destroys them after.
        self.abandoned: set[str] = set()
        self.starting = 0
        self.warm = False
        self.recycled = 0
        self.create_failures = 0
        self.failing = False
        self.last_recycle_s = 0.0
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def fill(self) -> None:
        """Start containers until the pool has its size; returns once all are up."""
        missing = self.size - len(self.live) - self.starting
        await asyncio.gather(*(self._add() for _ in range(missing)))
        self.warm = True

    async def _add(self, replacing_since: float | None = None) -> None:
        self.starting += 1
        delay = RETRY_DELAY_S
        try:
            while not self.closing:
                name = next(self.names)
                began = time.monotonic()
                try:
                    await self._in_lxc(self._start, name)
                    await self._await_serving(name)
                except asyncio.CancelledError:
                    self.abandoned.add(name)
                    raise
                except Exception as exc:  # the pool must outlive any one failed start
                    self.create_failures += 1
                    self.failing = True
                    logs.event(log, "container_failed", f"cannot start {name}: {exc} (next "
                               f"try in {delay:.0f} s)", level=logging.WARNING, container=name,
                               kind=self.kind.name, retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, MAX_RETRY_DELAY_S)  # a broken host is not hammered
                    continue
                self.failing = False
                if self.closing:
                    await self._in_lxc(self.containers.destroy, name)
                    return
                if replacing_since is not None:
                    self.last_recycle_s = time.monotonic() - replacing_since
                logs.event(log, "container_created", f"{name} serves", container=name,
                           kind=self.kind.name, seconds=round(time.monotonic() - began, 3),
                           replacing=replacing_since is not None)
                self.live.add(name)
                self.announce(self, name)
                return
        finally:
            self.starting -= 1

    def _start(self, name: str) -> None:
        self.containers.start(name, self.kind.environment, self.kind.preload)

    async def _await_serving(self, name: str) -> None:
        """Wait for the zygote off the LXC thread, so other starts and stops go on."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.containers.wait_until_serving, name)
        except ContainerError:
            await self._in_lxc(self.containers.destroy, name)
            raise

    async def _in_lxc(self, func: Callable[[str], object], name: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.lxc, func, name)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def recycle(self, name: str, reason: str) -> None:
        """Replace a container a run left dirty: the replacement starts first."""
        logs.event(log, "container_destroyed", f"destroying {name}: {reason}", container=name,
                   kind=self.kind.name, reason=reason)
        self.live.discard(name)
        self.recycled += 1
        since = time.monotonic()
        if not self.closing:
            self._background(self._add(replacing_since=since))
        self._background(self._destroy(name))

    async def _destroy(self, name: str) -> None:
        await asyncio.sleep(0)  # let a replacement reach the LXC thread first
        try:
            await self._in_lxc(self.containers.destroy, name)
        except ContainerError as exc:
            log.warning(f"cannot destroy {name}: {exc}")

    async def close(self) -> None:
        """Destroy every container of the pool (handed-over ones too: the front is gone),
        and any a stop interrupted while it started (the one LXC thread runs its start to
        the end first)."""
        self.closing = True
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        names, self.live = sorted(self.live | self.abandoned), set()
        self.abandoned = set()
        for name in names:
            try:
                await self._in_lxc(self.containers.destroy, name)
            except ContainerError as exc:
                log.warning(f"cannot destroy {name}: {exc}")


class Manager:
    """Hands containers to the front over the channel and takes back the dirty ones."""

    def __init__(self, config: RunnerConfig, containers: Containers,
                 writer: asyncio.StreamWriter) -> None:
        self.containers = containers
        self.writer = writer
        # LXC calls block; one thread keeps them serialized (the bindings fork).
        self.lxc = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lxc")
        self.pools = [Pool(kind, containers, self.lxc, self._announce)
                      for kind in kinds(config)]
        self.owner: dict[str, Pool] = {}

    def _announce(self, pool: Pool, name: str) -> None:
        self.owner[name] = pool
        socket_path = str(self.containers.socket_path(name))
        with contextlib.suppress(ConnectionError, RuntimeError):
            channel.write(self.writer, channel.Ready(name, pool.kind.name, socket_path,
                                                     self.containers.root_uid(name)))

    async def fill(self) -> None:
        began = time.monotonic()
        await asyncio.gather(*(pool.fill() for pool in self.pools))
        logs.event(log, "pool_warm", "every container is up", seconds=round(
            time.monotonic() - began, 3), size={p.kind.name: p.size for p in self.pools})

    def stats(self, request_id: int) -> channel.PoolStats:
        return channel.PoolStats(
            id=request_id, size=sum(p.size for p in self.pools),
            starting=sum(p.starting for p in self.pools),
            warm=all(p.warm for p in self.pools),
            recycled=sum(p.recycled for p in self.pools),
            create_failures=sum(p.create_failures for p in self.pools),
            failing=any(p.failing for p in self.pools),
            last_recycle_s=max(p.last_recycle_s for p in self.pools))

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Answer the front until it goes away."""
        try:
            while True:
                message = await channel.read_front(reader)
                if isinstance(message, channel.Recycle):
                    pool = self.owner.pop(message.name, None)
                    if pool is None:
                        log.warning(f"ignored a recycle of {message.name!r}, never handed over")
                    else:
                        pool.recycle(message.name, message.reason)
                else:
                    channel.write(self.writer, self.stats(message.id))
        except channel.ChannelError as exc:
            log.warning(f"front channel closed: {exc}")

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        self.lxc.shutdown(wait=True)
