"""The privileged pool manager: keeps N warm containers, leases them one run at a time,
and replaces every container whose run ended dirty in the background.

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
from stockade.runner.config import RunnerConfig
from stockade.runner.containers import ContainerError, Containers

RETRY_DELAY_S = 1.0  # after a failed create, before the next attempt


def log(message: str) -> None:
    print(f"stockade-pool: {message}", file=sys.stderr, flush=True)


class Pool:
    def __init__(self, config: RunnerConfig, containers: Containers) -> None:
        self.config = config
        self.containers = containers
        self.names = (f"{config.container_prefix}{n:05d}" for n in itertools.count(1))
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
        # LXC calls block; one thread keeps them serialized (the bindings fork).
        self.lxc = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lxc")
        self.tasks: set[asyncio.Task[None]] = set()

    # -- filling ---------------------------------------------------------------------------

    async def fill(self) -> None:
        """Start containers until the pool has its size; returns once all are up."""
        missing = self.config.pool_size - len(self.idle) - len(self.leased) - self.starting
        await asyncio.gather(*(self._add() for _ in range(missing)))
        self.warm = True

    async def _add(self, replacing_since: float | None = None) -> None:
        self.starting += 1
        try:
            while not self.closing:
                name = next(self.names)
                try:
                    await self._in_lxc(self.containers.start, name)
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

    def stats(self, request_id: int) -> control.PoolStats:
        return control.PoolStats(
            id=request_id, size=self.config.pool_size, idle=len(self.idle),
            leased=len(self.leased), starting=self.starting, warm=self.warm,
            recycled=self.recycled, create_failures=self.create_failures, failing=self.failing,
            last_recycle_s=self.last_recycle_s)

    # -- serving the front -----------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the front until it goes away; then every container it held is dirty."""
        held: set[str] = set()
        try:
            while True:
                message = await control.read_front(reader)
                if isinstance(message, control.Acquire):
                    self._background(self._lease(message.id, held, writer))
                elif isinstance(message, control.Release):
                    if message.name in held:
                        held.discard(message.name)
                        self.release(message.name, message.dirty)
                else:
                    control.write(writer, self.stats(message.id))
        except control.ChannelError as exc:
            log(f"front channel closed: {exc}")
        finally:
            for name in held:
                self.release(name, dirty=True)

    async def _lease(self, request_id: int, held: set[str],
                     writer: asyncio.StreamWriter) -> None:
        name = await self.acquire()
        held.add(name)
        socket_path = str(self.containers.socket_path(name))
        with contextlib.suppress(ConnectionError, RuntimeError):
            control.write(writer, control.Lease(request_id, name, socket_path))

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
        self.lxc.shutdown(wait=True)
