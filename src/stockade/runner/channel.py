"""The channel between the privileged pool manager and the unprivileged HTTP front: its
messages and their framing, nothing else.

The manager hands each container it starts to the front (`Ready`); the front leases them to
runs itself, with no round trip, and hands back only the ones a run left dirty
(`Recycle`). One line of typed JSON per message, capped in size, over a Unix socket: a
socketpair when the manager forks the front, or the manager's `front.sock` when the front
is a service of its own, which then first gets a `Hello` and the listening socket. The
front can never name a container the manager did not hand it: such a Recycle is ignored.
If the front goes away, the manager destroys everything it had handed over.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Annotated

import msgspec

from stockade.runner.config import RunnerConfig
from stockade.wire import EnvironmentInfo

MAX_LINE = 4096
MAX_HELLO = 65536


class Hello(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="hello"):
    """Manager to a front that connected to it, once, with the listening socket attached:
    the configuration the manager serves (so the two never disagree) and what the images
    of the environments it serves hold."""

    environments: list[EnvironmentInfo]
    config: RunnerConfig


class Ready(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="ready"):
    """Manager to front: this container's zygote serves; it is the front's until recycled."""

    name: str
    kind: str
    socket: str
    root_uid: int  # the container's root on the host: its socket's owner, and its zygote's


class Recycle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="recycle"):
    """Front to manager: a run left this container dirty; destroy and replace it."""

    name: str
    reason: Annotated[str, msgspec.Meta(max_length=32, pattern="^[a-z_]*$")] = ""


class StatsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="stats"):
    id: int


class PoolStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="pool_stats"):
    id: int
    size: int
    starting: int
    warm: bool  # every container of the pool has been up at least once
    recycled: int
    create_failures: int
    failing: bool  # the latest container creation failed
    last_recycle_s: float


FrontMessage = Recycle | StatsRequest
ManagerMessage = Ready | PoolStats
_front_decoder = msgspec.json.Decoder(FrontMessage)
_hello_decoder = msgspec.json.Decoder(Hello)
_manager_decoder = msgspec.json.Decoder(ManagerMessage)


class ChannelError(RuntimeError):
    """The other side sent something outside the schema, or went away."""


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
    """What the manager reads: a message from the front."""
    return await _read(reader, _front_decoder)  # type: ignore[return-value]


async def read_manager(reader: asyncio.StreamReader) -> ManagerMessage:
    """What the front reads: a message from the manager."""
    return await _read(reader, _manager_decoder)  # type: ignore[return-value]


def decode_hello(data: bytes) -> Hello:
    try:
        return _hello_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChannelError(f"invalid hello: {exc}") from None


def frame(message: msgspec.Struct) -> bytes:
    """A message as the channel frames it: one line of JSON."""
    return msgspec.json.encode(message) + b"\n"


def write(writer: asyncio.StreamWriter, message: msgspec.Struct) -> None:
    writer.write(frame(message))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel:
    how each side of the service checks who the other is."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return pid, uid, gid
