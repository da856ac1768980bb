"""`stockade serve`: the pool manager, the root process, and the start of the service.

What needs root stays here: the images, /etc/subuid, creating, starting and destroying LXC
containers, removing their cgroups, binding the listening socket (so any port works). The
HTTP front (`front/main.py`) runs as the runner user with no capabilities and reaches the
pool only through a typed channel.

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
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

from stockade import environment
from stockade.runner import channel, keys, logs
from stockade.runner.channel import peer_credentials
from stockade.runner.config import RunnerConfig, host_memory_mib, pool_memory_cap_mib
from stockade.runner.front.main import front_main
from stockade.runner.front.pages import Pages
from stockade.runner.lifecycle import FRONT_SOCKET, ServiceError, notify_systemd
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
from stockade.wire import EnvironmentInfo, Package

log = logging.getLogger(__name__)


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


