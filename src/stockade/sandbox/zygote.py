"""The zygote: a preloaded interpreter that forks one confined run at a time.

It serves a unix SOCK_SEQPACKET socket. Per run it receives limits and five descriptors
(payload, stdin, stdout, stderr, outbox), hands the first four to a run it prepared
beforehand, enforces the wall-time and run-wide CPU limits from outside, brings back the
program's out/ files, and reports how the run ended. It never reads a run's program,
input or output, and it holds no secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import os
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from stockade import protocol
from stockade.limits import LimitError, Limits
from stockade.result import Outcome
from stockade.sandbox import confine, libc, run, seccomp
from stockade.sandbox.cgroups import CgroupDriver, CgroupError, RunCgroup
from stockade.sandbox.config import SandboxConfig

CPU_POLL_S = 0.01  # how often the run-wide CPU time is checked while a run is live
KILL_GRACE_S = 5.0  # how long a killed run may take to disappear before it is an error
SINGLE_THREADED_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                       "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A run's pid 1: reaps orphans, nothing else (Debian's catatonit, statically linked). An
# exec'd init costs ~0.25 ms a run; a forked copy of the zygote cost ~2.7 ms.
INIT_PROGRAM = ("/usr/bin/catatonit", "-P")
BASE_RO_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def log(message: str) -> None:
    print(f"stockade-zygote[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def read_only_paths(extra: list[str]) -> tuple[str, ...]:
    """Host paths a run sees read-only: the system, this interpreter and its packages."""
    wanted = [*BASE_RO_PATHS, sys.prefix, *sys.path, *extra]
    paths = sorted({os.path.normpath(p) for p in wanted
                    if p.startswith("/") and os.path.lexists(p)})
    cover: list[str] = []
    for path in paths:
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in cover):
            cover.append(path)
    return tuple(cover)


def make_plan(config: SandboxConfig) -> run.RunPlan:
    """What every run of a zygote with `config` gets: its root template (built here, under
    the state directory), namespaces, seccomp program and ceilings."""
    (Path(config.state_dir) / "root").mkdir(mode=0o700, exist_ok=True)
    root = confine.RootPlan(
        mount_point=str(Path(config.state_dir) / "root"),
        ro_paths=read_only_paths(config.extra_ro_paths),
        run_uid=config.run_uid, run_gid=config.run_gid,
        workdir_size_mib=config.workdir_size_mib, tmp_size_mib=config.tmp_size_mib,
        shm_size_mib=config.shm_size_mib)
    program = seccomp.build_program()
    return run.RunPlan(
        root=root, root_template_fd=make_root_template(root),
        namespaces=confine.namespace_flags(config.isolate_network),
        seccomp_program=program,
        seccomp_buffer=ctypes.create_string_buffer(program, len(program)),
        rlimit_nofile=config.rlimit_nofile, rlimit_nproc=config.rlimit_nproc,
        rlimit_stack_mib=config.rlimit_stack_mib,
        max_payload_bytes=config.max_payload_mib << 20,
        max_out_files=config.max_out_files, max_out_bytes=config.max_out_kib << 10,
        limit_ceiling=config.limits.maximum,
    )


def make_root_template(root: confine.RootPlan) -> int:
    """Build the read-only part of every run's root once, in a mount namespace of its own
    (a helper process builds it and exits); return a descriptor that keeps it alive."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        try:
            libc.unshare(libc.CLONE_NEWNS)
            confine.build_root_template(root)
            os.write(ready_w, b"ok")
        except BaseException as exc:
            os.write(ready_w, f"cannot build the runs' root: {exc}".encode()[:4000])
        finally:
            os.read(done_r, 1)  # keep the namespace alive until the zygote holds it
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 4096).decode(errors="replace")
        if answer != "ok":
            raise RuntimeError(answer or "the root template's builder died")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


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


class Zygote:
    def __init__(self, config: SandboxConfig) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the zygote must run as root (root in a user namespace will do)")
        if not os.access(INIT_PROGRAM[0], os.X_OK):
            raise FileNotFoundError(f"{INIT_PROGRAM[0]} is missing: every run's init is "
                                    "catatonit (Debian package catatonit)")
        self.config = config
        Path(config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cgroups = CgroupDriver(config.cgroup_parent)
        self.cgroups.prepare()
        self.cgroups.sweep(f"{config.name}-")
        self.plan = make_plan(config)
        confine.last_capability(), confine.environ_block()  # cached for every run
        self.pid_ns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.sequence = 0
        self.embryo: Embryo | None = None
        self.active: Embryo | None = None
        self.busy_cgroups: list[RunCgroup] = []
        self.children: set[int] = set()  # every init and worker started and not yet reaped
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def preload(self) -> None:
        """Import what runs need once, then freeze it so forks share it untouched."""
        for name in self.config.preload:
            importlib.import_module(name)
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise RuntimeError(f"preloading started {threads - 1} threads; a zygote must be "
                               "single-threaded to fork safely")
        gc.collect()
        gc.freeze()

    # -- serving -------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        while True:
            self._prewarm()
            conn, _ = listener.accept()
            with conn:
                self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        while True:
            self._prewarm()
            try:
                raw, fds = protocol.receive(conn, max_fds=len(protocol.START_FDS))
            except protocol.ProtocolError as exc:
                protocol.send(conn, protocol.Report(Outcome(error=str(exc))))
                continue
            except OSError:
                return
            if not raw:
                return
            try:
                outcome = self._handle(conn, raw, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if outcome is None:
                continue
            try:
                protocol.send(conn, protocol.Report(outcome))
            except OSError:
                return
            finally:
                self._release_finished()

    def _handle(self, conn: socket.socket, raw: bytes, fds: list[int]) -> Outcome | None:
        try:
            message = protocol.decode_client(raw)
        except protocol.ProtocolError as exc:
            return Outcome(error=str(exc))
        if isinstance(message, protocol.Cancel):
            return None  # nothing is running: nothing to cancel
        if len(fds) != len(protocol.START_FDS):
            return Outcome(error=f"a run needs {len(protocol.START_FDS)} descriptors "
                           f"({', '.join(protocol.START_FDS)}), got {len(fds)}")
        try:
            limits = self.config.limits.resolve(msgspec.structs.asdict(message.limits))
        except LimitError as exc:
            return Outcome(error=f"limits refused by the zygote: {exc.message}")
        return self._run(conn, limits, fds)

    # -- one run -------------------------------------------------------------------------

    def _run(self, conn: socket.socket, limits: Limits, fds: list[int]) -> Outcome:
        try:
            embryo = self.embryo or self._spawn()
        except (OSError, CgroupError) as exc:
            return Outcome(error=f"cannot prepare a run: {exc}")
        self.embryo, self.active = None, embryo
        try:
            embryo.cgroup.set_memory_limit(limits.memory_mib << 20)
            embryo.cgroup.set_pids_limit(limits.processes)  # the init is not in it
            embryo.cgroup.begin()
        except (CgroupError, OSError) as exc:
            self._kill(embryo)
            return Outcome(error=f"cannot apply cgroup limits: {exc}")
        started = time.monotonic()
        with contextlib.suppress(OSError):  # a dead worker says why on its error pipe
            protocol.send(embryo.go, protocol.Go(limits), fds[:len(protocol.WORKER_FDS)])
        return self._supervise(conn, embryo, limits, started, outbox=fds[-1])

    def _supervise(self, conn: socket.socket, embryo: Embryo, limits: Limits,
                   started: float, outbox: int) -> Outcome:
        deadline = started + limits.wall_time_s
        killed_for: str | None = None
        killed_at = 0.0
        with selectors.DefaultSelector() as sel:
            sel.register(embryo.worker_pidfd, selectors.EVENT_READ, "worker")
            sel.register(conn, selectors.EVENT_READ, "client")
            ended = False
            while not ended:
                now = time.monotonic()
                if killed_for is None:
                    reason = self._over_limit(embryo, limits, now, deadline)
                    if reason:
                        killed_for, killed_at = reason, now
                        self._kill(embryo)
                elif now - killed_at > KILL_GRACE_S:
                    return Outcome(error="the run did not end after SIGKILL")
                timeout = max(0.0, min(CPU_POLL_S, deadline - now)) if killed_for is None \
                    else KILL_GRACE_S
                for key, _ in sel.select(timeout):
                    if key.data == "worker":
                        ended = True
                    elif killed_for is None:
                        reason = self._read_cancel(conn, sel)
                        if reason:
                            killed_for, killed_at = reason, time.monotonic()
                            self._kill(embryo)
        wall = time.monotonic() - started
        _, status = os.waitpid(embryo.worker, 0)
        self.children.discard(embryo.worker)
        error = _read_error(embryo.errors)
        # A killed run is reaped first, so its figures include every process it had; one
        # that ended by itself is answered at once, and what it left is killed after.
        if killed_for is not None and not self._reap(embryo):
            return Outcome(error="the run's init could not be reaped", wall_time_s=wall)
        if killed_for is None and error is None:
            self._collect_outputs(embryo, outbox)
        return self._outcome(embryo.cgroup, status, error, killed_for, wall)

    def _collect_outputs(self, embryo: Embryo, outbox: int) -> None:
        """Fill the client's outbox from the program's out/, if it left one: in a process of
        the run's uid, after everything the run started is dead."""
        workdir = _take_workdir(embryo.go)
        if workdir is None:
            return
        try:
            if not run.has_out_dir(workdir):
                return
            self._kill(embryo)
            if not self._reap(embryo):
                return
            libc.setns(self.pid_ns_fd, libc.CLONE_NEWPID)  # not into the dead run's
            try:
                pid = os.fork()
            except OSError as exc:
                log(f"cannot collect a run's out/: {exc}")
                return
            if pid == 0:
                try:
                    run.collect_outputs(outbox, workdir, self.plan)
                finally:
                    os._exit(0)
            pidfd = os.pidfd_open(pid)
            if not _exited(pidfd, KILL_GRACE_S):  # the walk is capped; this is a backstop
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(pidfd)
        finally:
            os.close(workdir)

    def _over_limit(self, embryo: Embryo, limits: Limits, now: float,
                    deadline: float) -> str | None:
        if now >= deadline:
            return "wall_time"
        if embryo.cgroup.run_cpu_time_s() > limits.cpu_time_s:
            return "cpu_time"
        return None

    def _read_cancel(self, conn: socket.socket, sel: selectors.BaseSelector) -> str | None:
        try:
            raw, _ = protocol.receive(conn)
            message = protocol.decode_client(raw) if raw else None
        except (OSError, protocol.ProtocolError):
            message = None
            raw = b""
        if not raw:
            sel.unregister(conn)  # the client is gone: nobody wants this run any more
            return "cancelled"
        if isinstance(message, protocol.Cancel):
            return "output" if message.reason == "output_limit" else "cancelled"
        return None

    def _outcome(self, cgroup: RunCgroup, status: int, error: str | None,
                 killed_for: str | None, wall: float) -> Outcome:
        stats = {"wall_time_s": round(wall, 6), "killed_for": killed_for}
        try:
            stats |= {"cpu_time_s": round(cgroup.run_cpu_time_s(), 6),
                      "memory_peak_kib": cgroup.memory_peak_kib(),
                      "oom_killed": cgroup.oom_killed()}
        except (OSError, ValueError, CgroupError) as exc:
            return Outcome(error=f"cannot read the run's cgroup: {exc}", **stats)  # type: ignore[arg-type]
        if error is not None and killed_for is None:
            return Outcome(error=f"confinement failed: {error}", **stats)  # type: ignore[arg-type]
        if os.WIFEXITED(status):
            return Outcome(exit_code=os.WEXITSTATUS(status), **stats)  # type: ignore[arg-type]
        return Outcome(signal=os.WTERMSIG(status), **stats)  # type: ignore[arg-type]

    # -- run inits -----------------------------------------------------------------------

    def _spawn(self) -> Embryo:
        self.sequence += 1
        cgroup = self.cgroups.create(f"{self.config.name}-{self.sequence}")
        go, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors, errors_w = os.pipe2(os.O_CLOEXEC)
        procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_paths]
        init = worker = None
        # A shutdown signal raised inside fork's at-fork handlers would be swallowed by
        # Python; keep it pending until the fork is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            confine.enter_new_pid_namespace_for_children(self.pid_ns_fd)
            init = os.posix_spawn(INIT_PROGRAM[0], list(INIT_PROGRAM), {}, setsigmask=(),
                                  setsigdef=(signal.SIGPIPE,), file_actions=[
                                      (os.POSIX_SPAWN_DUP2, self.null, fd) for fd in (0, 1, 2)])
            self.children.add(init)  # recorded before a pending shutdown signal can strike
            worker = os.fork()  # pid 2 of the init's namespace
            if worker == 0:
                try:
                    run.worker_main(worker_end, errors_w, procs, self.plan)
                finally:
                    os._exit(1)
            self.children.add(worker)
            return Embryo(init, os.pidfd_open(init), worker, os.pidfd_open(worker), go,
                          errors, cgroup)
        except BaseException:
            for pid in (worker, init):  # the worker first: see _reap
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

    def _prewarm(self) -> None:
        if self.embryo is None:
            try:
                self.embryo = self._spawn()
            except (OSError, CgroupError) as exc:
                log(f"cannot prepare a run: {exc}")  # the next request retries, and reports

    def _kill(self, embryo: Embryo) -> None:
        """The init first: its end kills everything in the run's pid namespace."""
        for pidfd in (embryo.init_pidfd, embryo.worker_pidfd):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def _reap(self, embryo: Embryo, timeout_s: float = KILL_GRACE_S) -> bool:
        """Kill and reap the run's worker, then its init; False if they would not go. The
        worker first: an init cannot finish dying while a process of its namespace, even
        one whose parent is the zygote, is left a zombie."""
        self._kill(embryo)
        deadline = time.monotonic() + timeout_s
        for pid, pidfd in ((embryo.worker, embryo.worker_pidfd),
                           (embryo.init, embryo.init_pidfd)):
            if pid not in self.children:
                continue  # reaped already
            if not _exited(pidfd, deadline - time.monotonic()):
                return False
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.discard(pid)
        return True

    def _release_finished(self) -> None:
        """After the report is sent: end the finished run and drop its cgroup."""
        embryo, self.active = self.active, None
        if embryo is not None:
            self._kill(embryo)  # whatever the program left dies now
        self._prewarm()  # the next run's setup overlaps this reap on another core
        if embryo is not None:
            self._reap(embryo)
            _close_embryo(embryo)
            self.busy_cgroups.append(embryo.cgroup)
        self.busy_cgroups = [cg for cg in self.busy_cgroups if not cg.remove(timeout_s=0.05)]

    def close(self) -> None:
        """Kill every run process this zygote started and remove every cgroup it created."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:  # in whatever order they can go: workers before their inits
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
        self.children.clear()
        for embryo in (self.embryo, self.active):
            if embryo is not None:
                _close_embryo(embryo)
        self.embryo = self.active = None
        self.busy_cgroups = []
        with contextlib.suppress(OSError):
            os.close(self.plan.root_template_fd)
        # By prefix, so nothing a signal interrupted half-way is left behind.
        left = self.cgroups.sweep(f"{self.config.name}-", timeout_s=2.0)
        if left:
            log(f"cgroups still busy at exit: {left}")
        with contextlib.suppress(OSError):
            (Path(self.config.state_dir) / "root").rmdir()


def _exited(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind `pidfd` has ended (or ends within `timeout_s`)."""
    ready, _, _ = select.select([pidfd], [], [], max(0.0, timeout_s))
    return bool(ready)


def _close_embryo(embryo: Embryo) -> None:
    embryo.go.close()
    for fd in (embryo.errors, embryo.init_pidfd, embryo.worker_pidfd):
        os.close(fd)


def _read_error(errors: int) -> str | None:
    """What the worker wrote before its program started (it closes the pipe first)."""
    os.set_blocking(errors, False)
    try:
        text = os.read(errors, run.MAX_ERROR).decode(errors="replace")
    except BlockingIOError:
        return None
    return text or None


def _take_workdir(go: socket.socket) -> int | None:
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


def listen(config: SandboxConfig) -> socket.socket:
    path = Path(config.socket_path)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chown(path, config.socket_owner_uid, config.socket_owner_gid)
    os.chmod(path, config.socket_mode)
    listener.listen(8)
    return listener


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stockade-zygote")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="path of a JSON SandboxConfig")
    group.add_argument("--config-json", help="a JSON SandboxConfig")
    args = parser.parse_args(argv)
    raw = Path(args.config).read_bytes() if args.config else args.config_json.encode()
    try:
        config = msgspec.json.decode(raw, type=SandboxConfig)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        print(f"stockade-zygote: invalid config: {exc}", file=sys.stderr)
        return 2
    os.environ.update(SINGLE_THREADED_ENV)
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, _terminate)
    zygote = Zygote(config)
    try:
        zygote.preload()
        listener = listen(config)
        print("ready", flush=True)
        zygote.serve(listener)
    finally:
        zygote.close()
        with contextlib.suppress(FileNotFoundError):
            Path(config.socket_path).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
