"""The privileged pool manager: keeps warm containers of each kind (a lean one preloading
the standard library, a full one preloading numpy and pandas), leases them one run at a
time, and replaces every container whose run ended dirty in the background.

It runs as root (LXC, cgroups) and does nothing else: no HTTP, no request parsing. It
trusts nothing the front says beyond the channel's schema: a release of a container it
did not lease is ignored, and if the front goes away every leased container is recycled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stockade.runner import control
from stockade.runner.config import FULL, Kind, RunnerConfig, kinds
from stockade.runner.containers import ContainerError, Containers

RETRY_DELAY_S = 1.0  # after a failed create, before the next attempt


def log(message: str) -> None:
    print(f"stockade-pool: {message}", file=sys.stderr, flush=True)


class Pool:
    """The containers of one kind."""

    def __init__(self, kind: Kind, containers: Containers, lxc: ThreadPoolExecutor) -> None:
        self.kind = kind
        self.size = kind.size
        self.containers = containers
        prefix = containers.config.container_prefix
        self.names = (f"{prefix}{kind.name}-{n:05d}" for n in itertools.count(1))
        self.idle: collections.deque[str] = collections.deque()
        self.leased: set[str] = set()
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[str]] = collections.deque()
        self.warm = False
        self.recycled = 0
        self.create_failures = 0
        self.failing = False
        self.last_recycle_s = 0.0
        self.closing = False
        self.lxc = lxc
        self.tasks: set[asyncio.Task[None]] = set()

    # -- filling ---------------------------------------------------------------------------

    async def fill(self) -> None:
        """Start containers until the pool has its size; returns once all are up."""
        missing = self.size - len(self.idle) - len(self.leased) - self.starting
        await asyncio.gather(*(self._add() for _ in range(missing)))
        self.warm = True

    async def _add(self, replacing_since: float | None = None) -> None:
        self.starting += 1
        try:
            while not self.closing:
                name = next(self.names)
                try:
                    await self._in_lxc(self._start, name)
                    await self._await_serving(name)
                except ContainerError as exc:
                    self.create_failures += 1
                    self.failing = True
                    log(f"cannot start {name}: {exc}")
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                self.failing = False
                if self.closing:
                    await self._in_lxc(self.containers.destroy, name)
                    return
                if replacing_since is not None:
                    self.last_recycle_s = time.monotonic() - replacing_since
                self._give(name)
                return
        finally:
            self.starting -= 1

    def _give(self, name: str) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.leased.add(name)
                waiter.set_result(name)
                return
        self.idle.append(name)

    def _start(self, name: str) -> None:
        self.containers.start(name, self.kind.preload)

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

    # -- leasing ---------------------------------------------------------------------------

    async def acquire(self) -> str:
        if self.idle:
            name = self.idle.popleft()
            self.leased.add(name)
            return name
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, name: str, dirty: bool) -> None:
        if name not in self.leased:
            log(f"ignored a release of {name!r}, which is not leased")
            return
        self.leased.discard(name)
        if dirty or self.closing:
            self._background(self._recycle(name))
        else:
            self._give(name)

    async def _recycle(self, name: str) -> None:
        since = time.monotonic()
        self.recycled += 1
        if not self.closing:
            self._background(self._add(replacing_since=since))
            await asyncio.sleep(0)  # let the replacement reach the LXC thread first
        try:
            await self._in_lxc(self.containers.destroy, name)
        except ContainerError as exc:
            log(f"cannot destroy {name}: {exc}")

    # -- shutdown --------------------------------------------------------------------------

    async def close(self) -> None:
        """Destroy every container of the pool (leased ones too: the front is gone)."""
        self.closing = True
        for waiter in self.waiters:
            waiter.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        names = [*self.idle, *self.leased]
        self.idle.clear()
        self.leased.clear()
        for name in names:
            try:
                await self._in_lxc(self.containers.destroy, name)
            except ContainerError as exc:
                log(f"cannot destroy {name}: {exc}")


class Manager:
    """Serves the front over the channel: leases from the pool of the kind asked for."""

    def __init__(self, config: RunnerConfig, containers: Containers) -> None:
        self.containers = containers
        # LXC calls block; one thread keeps them serialized (the bindings fork).
        self.lxc = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lxc")
        self.pools = {kind.name: Pool(kind, containers, self.lxc) for kind in kinds(config)}
        self.tasks: set[asyncio.Task[None]] = set()

    async def fill(self) -> None:
        await asyncio.gather(*(pool.fill() for pool in self.pools.values()))

    def _pool(self, kind: str) -> Pool:
        return self.pools.get(kind) or self.pools[FULL]

    def stats(self, request_id: int) -> control.PoolStats:
        pools = list(self.pools.values())
        return control.PoolStats(
            id=request_id, size=sum(p.size for p in pools), idle=sum(len(p.idle) for p in pools),
            leased=sum(len(p.leased) for p in pools), starting=sum(p.starting for p in pools),
            warm=all(p.warm for p in pools), recycled=sum(p.recycled for p in pools),
            create_failures=sum(p.create_failures for p in pools),
            failing=any(p.failing for p in pools),
            last_recycle_s=max(p.last_recycle_s for p in pools))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the front until it goes away; then every container it held is dirty."""
        held: dict[str, Pool] = {}
        try:
            while True:
                message = await control.read_front(reader)
                if isinstance(message, control.Acquire):
                    task = asyncio.create_task(self._lease(message, held, writer))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                elif isinstance(message, control.Release):
                    pool = held.pop(message.name, None)
                    if pool is not None:
                        pool.release(message.name, message.dirty)
                else:
                    control.write(writer, self.stats(message.id))
        except control.ChannelError as exc:
            log(f"front channel closed: {exc}")
        finally:
            for name, pool in held.items():
                pool.release(name, dirty=True)

    async def _lease(self, message: control.Acquire, held: dict[str, Pool],
                     writer: asyncio.StreamWriter) -> None:
        pool = self._pool(message.kind)
        name = await pool.acquire()
        held[name] = pool
        socket_path = str(self.containers.socket_path(name))
        with contextlib.suppress(ConnectionError, RuntimeError):
            control.write(writer, control.Lease(message.id, name, socket_path))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for pool in self.pools.values():
            await pool.close()
        self.lxc.shutdown(wait=True)
