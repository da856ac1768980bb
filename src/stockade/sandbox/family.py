"""A run's process family: an exec'd init (pid 1 of a new pid namespace) and a worker
forked from the zygote into it, prepared before the run's request; killed, reaped and
accounted for here. Every process started is recorded until it is reaped.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

from stockade import protocol
from stockade.sandbox import confine, worker
from stockade.sandbox.cgroups import CgroupDriver, RunCgroup
from stockade.sandbox.plan import RunPlan

KILL_GRACE_S = 5.0  # how long a killed run may take to disappear before it is an error
SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A run's pid 1: reaps orphans, nothing else (Debian's catatonit, statically linked). An
# exec'd init costs ~0.25 ms a run; a forked copy of the zygote cost ~2.7 ms.
INIT_PROGRAM = ("/usr/bin/catatonit", "-P")


@dataclass
class Embryo:
    """A run prepared before its request: an init, and a worker waiting for its program."""

    init: int  # pid 1 of the run's pid namespace
    init_pidfd: int
    worker: int  # pid 2: becomes the program
    worker_pidfd: int
    go: socket.socket  # to the worker: limits and descriptors; from it: its workdir
    errors: int  # why the worker's setup failed, if it did
    cgroup: RunCgroup

    def kill(self) -> None:
        """The init first: its end kills everything in the run's pid namespace."""
        for pidfd in (self.init_pidfd, self.worker_pidfd):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def close(self) -> None:
        self.go.close()
        for fd in (self.errors, self.init_pidfd, self.worker_pidfd):
            os.close(fd)


class Family:
    """Starts runs' process families and reaps them; knows every child it started."""

    def __init__(self, name: str, plan: RunPlan, cgroups: CgroupDriver,
                 pid_ns_fd: int) -> None:
        self.name = name
        self.plan = plan
        self.cgroups = cgroups
        self.pid_ns_fd = pid_ns_fd
        self.sequence = 0
        self.children: set[int] = set()  # every init and worker started and not yet reaped
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def spawn(self) -> Embryo:
        """A new run prepared: its init, and its worker confining itself."""
        self.sequence += 1
        cgroup = self.cgroups.create(f"{self.name}-{self.sequence}")
        go, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors, errors_w = os.pipe2(os.O_CLOEXEC)
        procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_paths]
        init = worker_pid = None
        # A shutdown signal raised inside fork's at-fork handlers would be swallowed by
        # Python; keep it pending until the fork is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            confine.enter_new_pid_namespace_for_children(self.pid_ns_fd)
            init = os.posix_spawn(INIT_PROGRAM[0], list(INIT_PROGRAM), {}, setsigmask=(),
                                  setsigdef=(signal.SIGPIPE,), file_actions=[
                                      (os.POSIX_SPAWN_DUP2, self.null, fd) for fd in (0, 1, 2)])
            self.children.add(init)  # recorded before a pending shutdown signal can strike
            worker_pid = os.fork()  # pid 2 of the init's namespace
            if worker_pid == 0:
                try:
                    worker.worker_main(worker_end, errors_w, procs, self.plan)
                finally:
                    os._exit(1)
            self.children.add(worker_pid)
            return Embryo(init, os.pidfd_open(init), worker_pid, os.pidfd_open(worker_pid), go,
                          errors, cgroup)
        except BaseException:
            for pid in (worker_pid, init):  # the worker first: see reap
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    self.children.discard(pid)
            go.close()
            os.close(errors)
            cgroup.remove(timeout_s=0.5)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in procs:
                os.close(fd)
            worker_end.close()
            os.close(errors_w)

    def reap(self, embryo: Embryo, timeout_s: float = KILL_GRACE_S) -> bool:
        """Kill and reap the run's worker, then its init; False if they would not go. The
        worker first: an init cannot finish dying while a process of its namespace, even
        one whose parent is the zygote, is left a zombie."""
        embryo.kill()
        deadline = time.monotonic() + timeout_s
        for pid, pidfd in ((embryo.worker, embryo.worker_pidfd),
                           (embryo.init, embryo.init_pidfd)):
            if pid not in self.children:
                continue  # reaped already
            if not exited(pidfd, deadline - time.monotonic()):
                return False
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.discard(pid)
        return True

    def kill_all(self) -> None:
        """Kill and reap every process this family started, in whatever order they go."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:  # workers before their inits
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
        self.children.clear()


def exited(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind `pidfd` has ended (or ends within `timeout_s`)."""
    ready, _, _ = select.select([pidfd], [], [], max(0.0, timeout_s))
    return bool(ready)


def read_error(errors: int) -> str | None:
    """What the worker wrote before its program started (it closes the pipe first)."""
    os.set_blocking(errors, False)
    try:
        text = os.read(errors, worker.MAX_ERROR).decode(errors="replace")
    except BlockingIOError:
        return None
    return text or None


def take_workdir(go: socket.socket) -> int | None:
    """The workdir descriptor the worker sent before it confined itself, if it did."""
    go.setblocking(False)
    try:
        raw, fds = protocol.receive(go, max_fds=1)
    except (OSError, protocol.ProtocolError):
        return None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    try:
        protocol.decode_workdir(raw)
    except protocol.ProtocolError:
        os.close(fds[0])
        return None
    return fds[0]
