"""The channel between the privileged pool manager and the unprivileged HTTP front.

One line of typed JSON per message, capped in size, over a socketpair. The front can only
ask for a container, give one back (saying whether its run ended clean) and read the pool's
counters; it can never name a container the manager did not lease to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Literal

import msgspec

MAX_LINE = 4096


class Acquire(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="acquire"):
    id: int
    kind: str  # which pool; an unknown kind gets the full pool


class Release(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="release"):
    name: str
    dirty: bool


class StatsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="stats"):
    id: int


class Lease(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="lease"):
    id: int
    name: str
    socket: str


class PoolStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="pool_stats"):
    id: int
    size: int
    idle: int
    leased: int
    starting: int
    warm: bool  # every container of the pool has been up at least once
    recycled: int
    create_failures: int
    failing: bool  # the latest container creation failed
    last_recycle_s: float


FrontMessage = Acquire | Release | StatsRequest
ManagerMessage = Lease | PoolStats
_front_decoder = msgspec.json.Decoder(FrontMessage)
_manager_decoder = msgspec.json.Decoder(ManagerMessage)


class ChannelError(RuntimeError):
    """The other side sent something outside the schema, or went away."""


def _encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message) + b"\n"


async def _read(reader: asyncio.StreamReader, decoder: msgspec.json.Decoder[object]) -> object:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise ChannelError("the other side closed the channel") from None
    except asyncio.LimitOverrunError:
        raise ChannelError(f"a message over {MAX_LINE} bytes") from None
    try:
        return decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChannelError(f"invalid message: {exc}") from None


async def read_front(reader: asyncio.StreamReader) -> FrontMessage:
    return await _read(reader, _front_decoder)  # type: ignore[return-value]


def write(writer: asyncio.StreamWriter, message: msgspec.Struct) -> None:
    writer.write(_encode(message))


class PoolClient:
    """The front's side: acquire/release containers, read the pool's counters."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Lease | PoolStats]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._dispatch())

    async def _dispatch(self) -> None:
        try:
            while True:
                message = await _read(self.reader, _manager_decoder)
                assert isinstance(message, Lease | PoolStats)
                future = self.waiting.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
                elif isinstance(message, Lease):
                    self.release(message.name, dirty=False)  # its asker gave up: give it back
        except ChannelError as exc:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(exc)
            if not self.closed.done():
                self.closed.set_result(str(exc))

    async def _ask(self, message: Acquire | StatsRequest, kind: Literal["lease", "stats"]
                   ) -> Lease | PoolStats:
        if self.closed.done():
            raise ChannelError(f"the pool manager is gone: {self.closed.result()}")
        future: asyncio.Future[Lease | PoolStats] = asyncio.get_running_loop().create_future()
        self.waiting[message.id] = future
        write(self.writer, message)
        try:
            return await future
        finally:
            self.waiting.pop(message.id, None)

    async def acquire(self, kind: str) -> Lease:
        lease = await self._ask(Acquire(next(self.ids), kind), "lease")
        assert isinstance(lease, Lease)
        return lease

    def release(self, name: str, dirty: bool) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            write(self.writer, Release(name, dirty))

    async def stats(self) -> PoolStats:
        stats = await self._ask(StatsRequest(next(self.ids)), "stats")
        assert isinstance(stats, PoolStats)
        return stats
