"""`stockade front`: the HTTP front, the unprivileged process. Started by the manager's
fork (`stockade serve`) or as a unit of its own as the runner user (`stockade front`, for a
manager that runs `serve --external-front`); either way it serves HTTP and reaches the pool
only through the typed channel. It never imports the manager, nor LXC.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from stockade.runner import channel, logs
from stockade.runner.channel import peer_credentials
from stockade.runner.config import RunnerConfig, kinds
from stockade.runner.front.api import Api
from stockade.runner.front.environments import Catalogue
from stockade.runner.front.metrics import Metrics
from stockade.runner.front.pages import Pages
from stockade.runner.front.pool_client import PoolClient
from stockade.runner.front.runs import Runs
from stockade.runner.front.sessions import Sessions
from stockade.runner.front.tenants import Tenants
from stockade.runner.keys import KeyRing
from stockade.runner.lifecycle import ServiceError, notify_systemd
from stockade.sandbox import confine
from stockade.wire import EnvironmentInfo

log = logging.getLogger(__name__)


def front(socket_path: str, connect_timeout_s: float) -> int:
    """`stockade front`: the HTTP front as a service of its own, started as the runner
    user (never root), for a manager that runs `serve --external-front`."""
    logs.setup()
    if os.geteuid() == 0:
        raise ServiceError("the front runs as the runner's user, never as root: start it "
                           "as that user (its systemd unit does), or let `stockade serve` "
                           "fork it")
    conn = connect_manager(socket_path, connect_timeout_s)
    hello, listener = receive_hello(conn)
    confine.set_no_new_privs()
    return asyncio.run(front_main(hello.config, conn, listener, hello.environments, Pages(),
                                  own_unit=True))


def connect_manager(path: str, timeout_s: float) -> socket.socket:
    """The manager's socket, once it listens, and only if root holds the other end."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise ServiceError(f"no pool manager listens at {path} after {timeout_s:.0f} "
                                   "s: start it (`stockade serve --external-front`, the "
                                   "stockade-runner unit)") from None
            time.sleep(0.2)
        except OSError as exc:
            conn.close()
            raise ServiceError(f"cannot connect to the pool manager at {path}: "
                               f"{exc.strerror}") from None
    _, uid, _ = peer_credentials(conn)
    if uid != 0:
        conn.close()
        raise ServiceError(f"{path} is served by uid {uid}, not root: not a stockade pool "
                           "manager; refusing it")
    return conn


def receive_hello(conn: socket.socket) -> tuple[channel.Hello, socket.socket]:
    """The manager's Hello line and the listening socket it carries."""
    data, fds, _, _ = socket.recv_fds(conn, channel.MAX_HELLO, 4)
    listeners = [socket.socket(fileno=fd) for fd in fds]
    try:
        while data and not data.endswith(b"\n") and len(data) < channel.MAX_HELLO:
            more = conn.recv(channel.MAX_HELLO - len(data))
            if not more:
                break
            data += more
        if len(listeners) != 1:
            raise ServiceError(f"the pool manager sent {len(listeners)} sockets, not its "
                               "listener")
        listener = listeners[0]
        if listener.type != socket.SOCK_STREAM or not listener.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ServiceError("what the pool manager sent is not a listening socket")
        try:
            return channel.decode_hello(data), listener
        except channel.ChannelError as exc:
            raise ServiceError(f"the pool manager's hello: {exc}") from None
    except BaseException:
        for sock in listeners:
            sock.close()
        raise


async def front_main(config: RunnerConfig, conn: socket.socket, listener: socket.socket,
                     envs: list[EnvironmentInfo], pages: Pages, *,
                     own_unit: bool = False) -> int:
    """Serve HTTP until told to stop or the manager goes; `own_unit`: this process is its
    systemd unit's main process (it tells systemd when it serves)."""
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    pool = PoolClient(reader, writer, [kind.name for kind in kinds(config)])
    ring = KeyRing(Path(config.keys_file))
    catalogue = Catalogue(envs)
    runs = Runs(config, pool, Metrics(catalogue.default.version))
    sessions = Sessions(config, runs)
    sessions.start()
    app = Api(config, runs, Tenants(config, ring), catalogue, pages, sessions=sessions).app()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, listener)
    await site.start()
    who = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    access = (f"{len(ring.by_id)} API keys from {config.keys_file}"
              + (", and anonymous callers" if config.anonymous else ""))
    logs.event(log, "serving", f"serving on http://{config.host}:{config.port} as {who}; "
               f"{access}", host=config.host, port=config.port, keys=len(ring.by_id),
               anonymous=config.anonymous is not None)
    if config.anonymous is not None:
        logs.event(log, "anonymous_access", "anyone who reaches this port may run code "
                   "(`anonymous` is set); use API keys before serving beyond this host",
                   level=logging.WARNING)
    elif not ring.by_id:
        logs.event(log, "no_keys", f"no API keys in {config.keys_file}: every run gets 401 "
                   "until `stockade keys add NAME` makes one", level=logging.WARNING)
    if own_unit:
        notify_systemd(f"READY=1\nSTATUS=serving on {config.host}:{config.port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    waiters = [asyncio.create_task(stopping.wait()),
               asyncio.create_task(asyncio.wait([pool.closed]))]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    await site.stop()  # no new connections; in-flight requests go on
    await sessions.drain()
    drained = await runs.drain(config.drain_timeout_s)
    await runner.cleanup()
    writer.close()
    return 0 if drained and stopping.is_set() else 1
