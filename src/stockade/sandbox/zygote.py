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
import gc
import importlib
import logging
import math
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from stockade import protocol
from stockade.limits import LimitError, Limits
from stockade.result import KillReason, Outcome
from stockade.sandbox import collector, confine
from stockade.sandbox import session_driver as _session_driver  # noqa: F401 - see preload
from stockade.sandbox.cgroups import CgroupDriver, CgroupError, RunCgroup
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.family import (
    INIT_PROGRAM,
    KILL_GRACE_S,
    SHUTDOWN_SIGNALS,
    Embryo,
    Family,
    read_error,
    take_workdir,
)
from stockade.sandbox.plan import make_plan

CPU_POLL_S = 0.01  # how often the run-wide CPU time is checked while a run is live
EXIT_UNCLEAN = 3  # the zygote's exit status when it cannot prove a finished run is gone
# What preloaded modules read as they load: one thread each (pandas loads pyarrow where it
# is installed, whose jemalloc would start a background thread), figures drawn to PNG, and
# matplotlib's font cache where the image built it (runs see their own environment).
PRELOAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
               "JE_ARROW_MALLOC_CONF": "background_thread:false",
               "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/usr/local/share/stockade/matplotlib"}
log = logging.getLogger(__name__)


def _warm_pandas(pd: Any) -> None:
    """A first frame loads pandas' lazy modules and, where pyarrow backs its strings,
    arrow's allocator and kernels: ~10 ms of every pandas run, paid once here instead."""
    frame = pd.DataFrame({"n": [1, 2], "s": ["a", "b"]})
    repr(frame), frame.describe(), frame.groupby("s")["n"].sum()


# What a preloaded module's first use costs, paid in the zygote (no threads may start).
WARM_UPS: dict[str, Callable[[Any], None]] = {"pandas": _warm_pandas}


# A client's Cancel names why (a limit it holds): the run's result names that limit.
CANCEL_KILLS = {"output_limit": KillReason.OUTPUT, "wall_time_limit": KillReason.WALL_TIME}


@dataclass
class Watch:
    """What a live run is held to: its wall-clock deadline and its CPU cap (a session's:
    its life and total, and the current call's budget when that is lower)."""

    limits: Limits
    started: float
    session: protocol.SessionTerms | None = None
    call_cap: float = math.inf

    @property
    def deadline(self) -> float:
        life = self.session.ttl_s if self.session else self.limits.wall_time_s
        return self.started + life

    @property
    def cpu_cap(self) -> float:
        total = self.session.cpu_total_s if self.session else self.limits.cpu_time_s
        return min(total, self.call_cap)

    def begin_call(self, used: float, budget_s: float) -> None:
        self.call_cap = used + max(0.0, budget_s)


class UncleanRun(RuntimeError):
    """A finished run may not be gone: this zygote must serve no other. Its container is
    replaced; the zygote exits rather than guess."""


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
        self.family = Family(config.name, self.plan, self.cgroups, self.pid_ns_fd)
        self.embryo: Embryo | None = None
        self.active: Embryo | None = None
        self.busy_cgroups: list[tuple[RunCgroup, float]] = []  # and since when

    def preload(self) -> None:
        """Import what runs need once, warm what a first use would set up in every run,
        then freeze it so forks share it untouched (the session driver is imported with
        this module: a session's run finds it loaded)."""
        for name in self.config.preload:
            module = importlib.import_module(name)
            warm = WARM_UPS.get(name)
            if warm is not None:
                warm(module)
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
            outcome: Outcome | None
            try:
                raw, fds = protocol.receive(conn, max_fds=len(protocol.START_FDS))
            except protocol.ProtocolError as exc:
                outcome = Outcome(error=str(exc))
            except OSError:
                return
            else:
                if not raw:
                    return
                try:
                    outcome = self._handle(conn, raw, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                if outcome is None:
                    continue
            # The report first, so the client has it while the run is reaped; then Idle,
            # once the run is proven gone (or the zygote exits: UncleanRun).
            try:
                protocol.send(conn, protocol.Report(outcome))
            except OSError:
                self._release_finished()
                return
            self._release_finished()
            try:
                protocol.send(conn, protocol.Idle())
            except OSError:
                return

    def _handle(self, conn: socket.socket, raw: bytes, fds: list[int]) -> Outcome | None:
        try:
            message = protocol.decode_client(raw)
        except protocol.ProtocolError as exc:
            return Outcome(error=str(exc))
        if not isinstance(message, protocol.Start):
            return None  # nothing is running: nothing to cancel or probe
        if len(fds) != len(protocol.START_FDS):
            return Outcome(error=f"a run needs {len(protocol.START_FDS)} descriptors "
                           f"({', '.join(protocol.START_FDS)}), got {len(fds)}")
        try:
            limits = self.config.limits.admit(message.limits)
        except LimitError as exc:
            return Outcome(error=f"limits refused by the zygote: {exc.message}")
        session = message.session
        if session is not None and not (
                0 < session.ttl_s <= self.config.session_max_ttl_s
                and 0 < session.cpu_total_s <= self.config.session_max_cpu_s):
            return Outcome(error="session terms refused by the zygote: ttl_s within (0, "
                           f"{self.config.session_max_ttl_s}], cpu_total_s within (0, "
                           f"{self.config.session_max_cpu_s}]")
        return self._run(conn, limits, fds, session)

    # -- one run -------------------------------------------------------------------------

    def _run(self, conn: socket.socket, limits: Limits, fds: list[int],
             session: protocol.SessionTerms | None = None) -> Outcome:
        try:
            embryo = self.embryo or self.family.spawn()
        except (OSError, CgroupError) as exc:
            return Outcome(error=f"cannot prepare a run: {exc}")
        self.embryo, self.active = None, embryo
        try:
            embryo.cgroup.set_memory_limit(limits.memory_mib << 20)
            embryo.cgroup.set_pids_limit(limits.processes)  # the init is not in it
            embryo.cgroup.begin()
        except (CgroupError, OSError) as exc:
            embryo.kill()
            return Outcome(error=f"cannot apply cgroup limits: {exc}")
        started = time.monotonic()
        # A session's process lives across calls: its RLIMIT_CPU is the session's total.
        go = limits if session is None else msgspec.structs.replace(
            limits, cpu_time_s=session.cpu_total_s)
        with contextlib.suppress(OSError):  # a dead worker says why on its error pipe
            protocol.send(embryo.go, protocol.Go(go), fds[:len(protocol.WORKER_FDS)])
        return self._supervise(conn, embryo, Watch(limits, started, session),
                               outbox=fds[-1])

    def _supervise(self, conn: socket.socket, embryo: Embryo, watch: Watch,
                   outbox: int) -> Outcome:
        started, deadline = watch.started, watch.deadline
        killed_for: KillReason | None = None
        killed_at = 0.0
        with selectors.DefaultSelector() as sel:
            sel.register(embryo.worker_pidfd, selectors.EVENT_READ, "worker")
            sel.register(conn, selectors.EVENT_READ, "client")
            ended = False
            while not ended:
                now = time.monotonic()
                if killed_for is None:
                    reason = self._over_limit(embryo, watch, now)
                    if reason:
                        killed_for, killed_at = reason, now
                        embryo.kill()
                elif now - killed_at > KILL_GRACE_S:
                    return Outcome(error="the run did not end after SIGKILL")
                timeout = max(0.0, min(CPU_POLL_S, deadline - now)) if killed_for is None \
                    else KILL_GRACE_S
                for key, _ in sel.select(timeout):
                    if key.data == "worker":
                        ended = True
                    elif killed_for is None:
                        reason = self._read_client(conn, sel, embryo, watch)
                        if reason:
                            killed_for, killed_at = reason, time.monotonic()
                            embryo.kill()
        wall = time.monotonic() - started
        _, status = os.waitpid(embryo.worker, 0)
        self.family.children.discard(embryo.worker)
        error = read_error(embryo.errors)
        # A killed run is reaped first, so its figures include every process it had; one
        # that ended by itself is answered at once, and what it left is killed after.
        if killed_for is not None and not self.family.reap(embryo):
            return Outcome(error="the run's init could not be reaped", wall_time_s=wall)
        if killed_for is None and error is None and watch.session is None:
            self._collect_outputs(embryo, outbox)
        return self._outcome(embryo.cgroup, status, error, killed_for, wall)

    def _collect_outputs(self, embryo: Embryo, outbox: int) -> None:
        """Fill the client's outbox from the program's out/, if it left one: in a process of
        the run's uid, after everything the run started is dead."""
        workdir = take_workdir(embryo.go)
        if workdir is None:
            return
        try:
            if not collector.has_out_dir(workdir):
                return
            embryo.kill()
            if not self.family.reap(embryo):
                return
            problem = collector.run_collector(outbox, workdir, self.plan, self.pid_ns_fd)
            if problem:
                log.warning(problem)
        finally:
            os.close(workdir)

    def _over_limit(self, embryo: Embryo, watch: Watch, now: float) -> KillReason | None:
        if now >= watch.deadline:
            return KillReason.WALL_TIME
        if embryo.cgroup.run_cpu_time_s() > watch.cpu_cap:
            return KillReason.CPU_TIME
        return None

    def _read_client(self, conn: socket.socket, sel: selectors.BaseSelector, embryo: Embryo,
                     watch: Watch) -> KillReason | None:
        """A message from the client while a run lives: a Cancel (why), or a session's
        Probe (answered with its usage). A client that hangs up cancels."""
        try:
            raw, _ = protocol.receive(conn)
            message = protocol.decode_client(raw) if raw else None
        except (OSError, protocol.ProtocolError):
            message = None
            raw = b""
        if not raw:
            sel.unregister(conn)  # the client is gone: nobody wants this run any more
            return KillReason.CANCELLED
        if isinstance(message, protocol.Cancel):
            return CANCEL_KILLS.get(message.reason, KillReason.CANCELLED)
        if isinstance(message, protocol.Probe) and watch.session is not None:
            try:
                used = embryo.cgroup.run_cpu_time_s()
                usage = protocol.Usage(round(used, 6), embryo.cgroup.memory_peak_kib())
            except (OSError, ValueError, CgroupError):
                return None  # the run is ending; its report will say how
            if message.cpu_budget_s is not None:
                watch.begin_call(used, message.cpu_budget_s)
            with contextlib.suppress(OSError):
                protocol.send(conn, usage)
        return None

    def _outcome(self, cgroup: RunCgroup, status: int, error: str | None,
                 killed_for: KillReason | None, wall: float) -> Outcome:
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

    def _prewarm(self) -> None:
        if self.embryo is None:
            try:
                self.embryo = self.family.spawn()
            except (OSError, CgroupError) as exc:
                log.warning(f"cannot prepare a run: {exc}")  # the next request retries, and reports

    def _release_finished(self) -> None:
        """After the report is sent: end the finished run and drop its cgroup."""
        embryo, self.active = self.active, None
        if embryo is not None:
            embryo.kill()  # whatever the program left dies now
        self._prewarm()  # the next run's setup overlaps this reap on another core
        if embryo is not None:
            gone = self.family.reap(embryo)
            embryo.close()
            if not gone:
                raise UncleanRun("a finished run's init or worker would not die")
            self.busy_cgroups.append((embryo.cgroup, time.monotonic()))
        self.busy_cgroups = [(cg, since) for cg, since in self.busy_cgroups
                             if not cg.remove(timeout_s=0.05)]
        # A cgroup the kernel is still tearing down is fine; one with processes in it
        # long after its run was killed is not.
        for cgroup, since in self.busy_cgroups:
            if time.monotonic() - since > KILL_GRACE_S and not cgroup.is_empty():
                raise UncleanRun(f"processes are left in a finished run's cgroup "
                                 f"{cgroup.procs_paths[0].parent.name}")

    def close(self) -> None:
        """Kill every run process this zygote started and remove every cgroup it created."""
        self.family.kill_all()
        for embryo in (self.embryo, self.active):
            if embryo is not None:
                embryo.close()
        self.embryo = self.active = None
        self.busy_cgroups = []
        with contextlib.suppress(OSError):
            os.close(self.plan.root_template_fd)
        # By prefix, so nothing a signal interrupted half-way is left behind.
        left = self.cgroups.sweep(f"{self.config.name}-", timeout_s=2.0)
        if left:
            log.warning(f"cgroups still busy at exit: {left}")
        with contextlib.suppress(OSError):
            (Path(self.config.state_dir) / "root").rmdir()


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
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="stockade-zygote[%(process)d]: %(message)s")
    os.environ.update(PRELOAD_ENV)
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, _terminate)
    zygote = Zygote(config)
    try:
        zygote.preload()
        listener = listen(config)
        print("ready", flush=True)
        zygote.serve(listener)
    except UncleanRun as exc:
        log.error(f"{exc}: exiting, so that this container is replaced")
        return EXIT_UNCLEAN
    finally:
        zygote.close()
        with contextlib.suppress(FileNotFoundError):
            Path(config.socket_path).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
