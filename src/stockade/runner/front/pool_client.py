"""The front's side of the pool: the containers the manager handed over, leased to runs
locally with no round trip; dirty ones go back to the manager to be destroyed."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import os
import select
import socket
import stat
import time
from dataclasses import dataclass, field

from stockade.runner.channel import (
    ChannelError,
    PoolStats,
    Ready,
    Recycle,
    StatsRequest,
    peer_credentials,
    read_manager,
    write,
)
from stockade.runner.front import zygote_client as client


def connect_trusted(path: str, owner_uid: int) -> socket.socket:
    """Connect to a container's zygote socket only if it is a socket owned by the
    container's root, reached through no symlink, and served by a process of that uid.

    The container owns the directory the socket is in and may plant anything there. Its
    parent is root's, so the directory itself is pinned by a descriptor; the socket is
    checked without following links and reached through that descriptor; the peer's
    credentials close the window between that check and connect()."""
    directory, name = os.path.split(path)
    dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner_uid:
            raise PermissionError(errno.EPERM, f"{path} is not a socket owned by uid "
                                  f"{owner_uid}: not connecting")
        sock = client.connect(f"/proc/self/fd/{dirfd}/{name}")
    finally:
        os.close(dirfd)
    _, uid, _ = peer_credentials(sock)
    if uid != owner_uid:
        sock.close()
        raise PermissionError(errno.EPERM, f"{path} is served by uid {uid}, not {owner_uid}")
    return sock


@dataclass(eq=False)
class Lease:
    """A container the front holds, with the connection to its zygote once one is made."""

    name: str
    kind: str
    socket_path: str
    root_uid: int  # the container's root on the host, as the manager said
    connection: socket.socket | None = field(default=None, repr=False)
    runs: int = 0  # runs this container has served
    since: float = field(default_factory=time.monotonic)  # when the front first got it

    def hung_up(self) -> bool:
        """Whether the zygote closed its end while the container was idle (it exits when
        it cannot prove its last run gone) or said something it was not asked."""
        if self.connection is None:
            return False
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLHUP)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class PoolClient:
    """The front's side: idle containers by kind, leased locally; dirty ones go back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 kinds: list[str]) -> None:
        self.reader = reader
        self.writer = writer
        self.kinds = kinds
        self.idle: dict[str, collections.deque[Lease]] = {k: collections.deque() for k in kinds}
        # Per kind, the waiting runs of each caller, callers in turn: a container that
        # comes free goes to the caller first in line, who then goes to the back.
        self.waiters: dict[str, dict[str, collections.deque[asyncio.Future[Lease]]]] = {
            k: {} for k in kinds}
        self.leased = 0
        self.ids = itertools.count(1)
        self.asked: dict[int, asyncio.Future[PoolStats]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._dispatch())

    async def _dispatch(self) -> None:
        try:
            while True:
                message = await read_manager(self.reader)
                if isinstance(message, Ready):
                    self._give(Lease(message.name, message.kind, message.socket,
                                     message.root_uid))
                elif isinstance(message, PoolStats):
                    future = self.asked.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except ChannelError as exc:
            for future in self.asked.values():
                if not future.done():
                    future.set_exception(exc)
            if not self.closed.done():
                self.closed.set_result(str(exc))

    def _give(self, lease: Lease) -> None:
        kind = lease.kind if lease.kind in self.idle else self.kinds[0]
        callers = self.waiters[kind]
        while callers:
            caller, waiting = next(iter(callers.items()))
            del callers[caller]
            while waiting:
                waiter = waiting.popleft()
                if not waiter.done():
                    if waiting:  # to the back of the line, behind every other caller
                        callers[caller] = waiting
                    self.leased += 1
                    waiter.set_result(lease)
                    return
        self.idle[kind].append(lease)

    async def acquire(self, kind: str, caller: str = "") -> Lease:
        """An idle container of `kind`; when none is idle, `caller` waits its turn among
        the callers waiting for one. A kind with no pool is refused, never served from
        another: its containers may be another environment's."""
        if self.closed.done():
            raise ChannelError(f"the pool manager is gone: {self.closed.result()}")
        if kind not in self.idle:
            raise LookupError(f"no pool of kind {kind!r} (the pools are {self.kinds})")
        if self.idle[kind]:
            self.leased += 1
            return self.idle[kind].popleft()
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.waiters[kind].setdefault(caller, collections.deque()).append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given, then given up on
                self.leased -= 1
                self._give(waiter.result())
            else:
                self._forget(kind, caller, waiter)
            raise

    def _forget(self, kind: str, caller: str, waiter: asyncio.Future[Lease]) -> None:
        waiting = self.waiters[kind].get(caller)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(waiter)
            if not waiting:
                del self.waiters[kind][caller]

    def release(self, lease: Lease, dirty: str = "") -> None:
        """Back to the idle containers, or, given why it is `dirty`, to the manager."""
        self.leased -= 1
        if not dirty:
            self._give(lease)
            return
        lease.close()
        with contextlib.suppress(ConnectionError, RuntimeError):
            write(self.writer, Recycle(lease.name, dirty))

    @property
    def idle_count(self) -> int:
        return sum(len(idle) for idle in self.idle.values())

    async def stats(self) -> PoolStats:
        if self.closed.done():
            raise ChannelError(f"the pool manager is gone: {self.closed.result()}")
        request = StatsRequest(next(self.ids))
        future: asyncio.Future[PoolStats] = asyncio.get_running_loop().create_future()
        self.asked[request.id] = future
        write(self.writer, request)
        try:
            return await future
        finally:
            self.asked.pop(request.id, None)
