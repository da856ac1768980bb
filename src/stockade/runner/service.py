"""`stockade serve`: a privileged pool manager and an unprivileged HTTP front, two processes.

What needs root, and stays in the manager: building the image, /etc/subuid, creating,
starting and destroying LXC containers, removing their cgroups, binding the listening
socket (so any port works). The front (HTTP, validation, talking to zygotes) runs as the
runner user with no capabilities; it reaches the pool only through a typed channel.

The manager forks the front (`stockade serve`), or, under systemd, the front is a unit of
its own that scores as an unprivileged service (`stockade serve --external-front` waits at
`<run_dir>/front.sock` for `stockade front`, which runs as the runner user from the start;
each side checks the other's uid, and the manager hands over the configuration and the
listening socket).

Shutdown (SIGTERM/SIGINT to the manager): the front stops accepting, drains in-flight runs,
exits; then the manager destroys the pool. If either side dies, the other follows, and the
next start reconciles whatever was left.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

from aiohttp import web

from stockade import environment
from stockade.runner import channel, keys, logs
from stockade.runner.channel import EnvironmentInfo, Package
from stockade.runner.config import RunnerConfig, host_memory_mib, kinds, pool_memory_cap_mib
from stockade.runner.front.api import Api, Runs
from stockade.runner.front.environments import Catalogue
from stockade.runner.front.metrics import Metrics
from stockade.runner.front.pages import Pages
from stockade.runner.front.pool_client import PoolClient, peer_credentials
from stockade.runner.front.sessions import Sessions
from stockade.runner.front.tenants import Tenants
from stockade.runner.keys import KeyRing
from stockade.runner.manager import container_policy, images
from stockade.runner.manager.containers import ContainerError, Containers, ensure_subid_ranges
from stockade.runner.manager.lxc_cgroups import (
    make_pool_cgroup,
    remove_lxc_cgroups,
    remove_pool_cgroup,
)
from stockade.runner.manager.pool import Manager
from stockade.sandbox import confine, libc
from stockade.sandbox.cgroups import CgroupError

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """The service cannot start; the message says what to fix."""


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        return pwd.getpwnam(name)


def ensure_images(config: RunnerConfig) -> None:
    """The image each served environment needs (its lock and this code): already here, or
    imported from its archive in `image_archive_dir`; else the runner does not start."""
    for name in config.served:
        env = environment.get(name)
        if images.is_current(config, env):
            continue
        archive = images.archive_path(config, env, Path(config.image_archive_dir))
        if not archive.is_file():
            raise ServiceError(f"{images.missing_message(config, env)} (looked for it in "
                               f"{config.lxc_path} and at {archive})")
        log.info(f"importing the {name} image from {archive}")
        images.import_archive(config, archive)


def environment_infos(config: RunnerConfig) -> list[EnvironmentInfo]:
    """What the front tells callers of each served environment, from its image's stamp."""
    infos = []
    for name in config.served:
        env = environment.get(name)
        stamp = images.read_stamp(images.image_dir(config, env))
        if stamp is None:
            raise ServiceError(images.missing_message(config, env))
        packages = [Package(*pin.split("==", 1)) for pin in stamp.packages]
        infos.append(EnvironmentInfo(
            name=name, language=env.definition.language, version=stamp.python,
            description=env.definition.description, default=name == config.default_environment,
            packages=packages, preloaded=list(env.definition.preload)))
    return infos


def prepare_host(config: RunnerConfig) -> tuple[Containers, pwd.struct_passwd]:
    """Everything root does once before serving; idempotent. `release_host` undoes it."""
    user = ensure_user(config.user)
    ensure_subid_ranges(config)
    try:
        ensure_images(config)
    except images.ImageError as exc:
        raise ServiceError(str(exc)) from None
    try:
        containers = Containers(config, runner_gid=user.pw_gid)
    except ContainerError as exc:
        raise ServiceError(str(exc)) from None
    containers.prepare_directories()
    share_key_file(config, user)
    container_policy.write_seccomp_profile(config)
    left = containers.reconcile()
    if left:
        log.info(f"removed {len(left)} containers a previous runner left: {', '.join(left)}")
    try:
        cap = pool_memory_cap_mib(config, host_memory_mib())
        parent = make_pool_cgroup(config.container_prefix, cap << 20)
    except (ValueError, CgroupError) as exc:
        raise ServiceError(str(exc)) from None
    log.info(f"the pool's cgroup {parent} caps its containers at {cap} MiB together")
    images.prune(config)  # old images that only the removed containers were cloned from
    return containers, user


def share_key_file(config: RunnerConfig, user: pwd.struct_passwd) -> None:
    """The key file, checked, and readable by the front (the runner's group) alone."""
    path = Path(config.keys_file)
    try:
        found = keys.read(path)
        if path.exists():
            os.chown(path, 0, user.pw_gid)
            os.chmod(path, 0o640)
    except (keys.KeyFileError, OSError) as exc:
        raise ServiceError(str(exc)) from None
    logs.event(log, "config_loaded", f"{len(found.keys)} API keys; anonymous callers "
               f"{'allowed' if config.anonymous else 'refused'}", keys=len(found.keys),
               anonymous=config.anonymous is not None, containers=config.containers,
               wait_queue=config.wait_queue)


def listen(config: RunnerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        return socket.create_server((config.host, config.port), family=family, backlog=512)
    except OSError as exc:
        raise ServiceError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") \
            from None


def drop_privileges(user: pwd.struct_passwd) -> None:
    """The front's drop, with the sandbox's own steps: the runner user and group and no
    others, no capability in any set (the bounding set included), no_new_privs."""
    try:
        confine.drop_identity(user.pw_uid, user.pw_gid)
        confine.drop_capabilities()
        confine.set_no_new_privs()
    except OSError as exc:
        raise ServiceError(f"could not drop root for the front: {exc}") from None
    os.chdir("/")


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) how the service is: READY=1 once the pool is warm, so a
    `systemctl start` (and the rolling replacement) returns only when runs can start."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning(f"cannot notify systemd ({state!r}): {exc.strerror}")


FRONT_SOCKET = "front.sock"
DEFAULT_FRONT_SOCKET = str(Path(RunnerConfig().run_dir) / FRONT_SOCKET)


def serve(config: RunnerConfig, external_front: bool = False) -> int:
    logs.setup()
    if os.geteuid() != 0:
        raise ServiceError("serve needs root: it manages LXC containers and their cgroups "
                           "(the HTTP front drops to an unprivileged user)")
    front_pid = 0
    containers: Containers | None = None
    try:
        containers, user = prepare_host(config)
        listener = listen(config)
        envs = environment_infos(config)
        if external_front:
            return asyncio.run(serve_external_front(config, containers, user, listener,
                                                    envs))
        pages = Pages()  # read as root: the checkout may be where the runner user cannot read
        manager_end, front_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        manager_pid = os.getpid()
        front_pid = os.fork()
        if front_pid == 0:
            code = 1
            try:
                manager_end.close()
                drop_privileges(user)
                # After the uid change, which clears it; then make sure the manager lives.
                libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != manager_pid:
                    raise ServiceError("the pool manager exited before the front started")
                code = asyncio.run(front_main(config, front_end, listener, envs, pages))
            except BaseException as exc:  # report, then leave without running cleanup
                log.error(f"the front failed: {type(exc).__name__}: {exc}")
            finally:
                os._exit(code)
        front_end.close()
        listener.close()
        containers.keep_children.add(front_pid)
        return asyncio.run(manager_main(config, containers, manager_end, front_pid,
                                        child=True))
    finally:
        if front_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(front_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(front_pid, 0)
        if containers is not None:
            containers.close()
        release_host(config)


def release_host(config: RunnerConfig) -> None:
    """Undo what prepare_host made, on every way out: the pool's cgroups, the containers'
    seccomp profile, the run directories (only when empty: nothing of a container is
    left inside)."""
    remove_lxc_cgroups(config.container_prefix, config.container_prefix, prefix=True)
    busy = remove_pool_cgroup(config.container_prefix)
    if busy:
        log.warning(f"pool cgroups still busy at exit: {', '.join(busy)}")
    with contextlib.suppress(OSError):
        container_policy.seccomp_profile_path(config).unlink()
    for directory in (config.pool_socket_dir, Path(config.run_dir)):
        with contextlib.suppress(OSError):
            directory.rmdir()


async def serve_external_front(config: RunnerConfig, containers: Containers,
                               user: pwd.struct_passwd, listener: socket.socket,
                               envs: list[EnvironmentInfo]) -> int:
    """Wait for `stockade front` (its own unit, the runner user), hand it the listener,
    then manage the pool for it as for a forked front. A stop before it comes is a stop."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    hello = channel.Hello(environments=envs, config=config)
    accepting = asyncio.create_task(accept_front(config, user, listener, hello))
    stopped = asyncio.create_task(stopping.wait())
    await asyncio.wait([accepting, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    listener.close()
    if stopping.is_set():
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            conn, _ = await accepting
            conn.close()
        log.info("stopped before a front connected")
        return 0
    conn, front_pid = accepting.result()
    return await manager_main(config, containers, conn, front_pid, child=False)


async def accept_front(config: RunnerConfig, user: pwd.struct_passwd,
                       listener: socket.socket, hello: channel.Hello) -> tuple[socket.socket, int]:
    """The first connection to `<run_dir>/front.sock` from the runner user; anyone else's
    is refused. It gets the Hello, with the listening socket attached."""
    path = Path(config.run_dir) / FRONT_SOCKET
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        server.bind(str(path))
        os.chown(path, 0, user.pw_gid)
        os.chmod(path, 0o660)
        server.listen(4)
        server.setblocking(False)
        log.info(f"waiting for the front (`stockade front`) at {path}")
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(server)
            pid, uid, _ = peer_credentials(conn)
            if uid != user.pw_uid:
                log.warning(f"refused a front from uid {uid} (pid {pid}): the front runs "
                            f"as {user.pw_name}")
                conn.close()
                continue
            conn.setblocking(True)
            socket.send_fds(conn, [channel.frame(hello)], [listener.fileno()])
            log.info(f"the front (pid {pid}) connected")
            return conn, pid
    finally:
        server.close()
        path.unlink(missing_ok=True)


async def manager_main(config: RunnerConfig, containers: Containers, conn: socket.socket,
                       front_pid: int, child: bool) -> int:
    """Manage the pool for the front at the other end of `conn` until it is gone;
    `child`: the front is this process's child (else a unit of its own)."""
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    pool = Manager(config, containers, writer)
    loop = asyncio.get_running_loop()
    stopping = False

    def stop(signum: int) -> None:
        nonlocal stopping
        stopping = True
        log.info(f"{signal.Signals(signum).name}: draining")
        notify_systemd("STOPPING=1")
        with contextlib.suppress(ProcessLookupError):
            os.kill(front_pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    filling = asyncio.create_task(pool.fill())

    def fill_ended(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning(f"the pool cannot fill, stopping: {task.exception()!r}")
            stop(signal.SIGTERM)
        else:
            notify_systemd(f"READY=1\nSTATUS=serving with {config.all_containers} warm containers")

    filling.add_done_callback(fill_ended)
    try:
        await pool.serve(reader)  # until the front is gone
    finally:
        filling.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # fill_ended logged it
            await filling
        await pool.close()
        writer.close()
    if not child:  # its own unit: systemd restarts a failed front, and a failed manager
        log.info("stopped" if stopping else "the front went away; stopping")
        return 0 if stopping else 1
    code = await _front_exit_code(front_pid, config.drain_timeout_s + 10.0)
    log.info(f"stopped (front exit status {code})")
    return 0 if code == 0 else 1


async def _front_exit_code(pid: int, timeout_s: float) -> int:
    """The front has closed its channel, so it is on its way out; a hung one is killed."""
    deadline = time.monotonic() + timeout_s
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            log.warning("the front did not exit; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        await asyncio.sleep(0.05)


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
