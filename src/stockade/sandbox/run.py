"""A run's two processes, both forked from the zygote and never returning to its code.

Both are prepared before the request arrives. init (pid 1 of the run's pid namespace)
joins the run's cgroup, unshares the other namespaces in a private copy of the zygote's
root template, mounts the run's own /proc and tmpfs, and forks the worker, which confines
itself step by step and waits. On "go" the worker lowers its rlimits to the request's,
takes its stdio and runs the program in-process. When the worker ends, init reports and
exits, and the kernel kills whatever the program left in the namespace.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import fcntl
import itertools
import os
import signal
import socket
import stat
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from stockade import protocol
from stockade.limits import Limits
from stockade.sandbox import confine, libc
from stockade.sandbox.config import WORKDIR

MAX_OUT_ENTRIES = 4096  # directory entries the out/ collector looks at, at most
SETUP_FAILED = 125  # the worker's exit code when confinement failed (the pipe says why)
MAX_ERROR = 4000


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs from its zygote; shared, immutable, free of secrets."""

    root: confine.RootPlan
    root_template_fd: int  # the zygote's root template (a mount namespace), see confine
    namespaces: int
    seccomp_program: bytes
    seccomp_buffer: ctypes.Array[ctypes.c_char]
    rlimit_nofile: int
    rlimit_nproc: int
    rlimit_stack_mib: int
    max_payload_bytes: int
    limit_ceiling: Limits
    max_out_files: int
    max_out_bytes: int


def _reset_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the zygote forks with some blocked


def init_main(channel: socket.socket, go: socket.socket, cgroup_procs: list[int],
              plan: RunPlan) -> None:
    """The run's init. Never returns."""
    try:
        _reset_signals()
        for fd in cgroup_procs:
            os.write(fd, b"0")
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        confine.close_inherited_fds({channel.fileno(), go.fileno(), plan.root_template_fd})
        confine.join_root_template(plan.root_template_fd)
        confine.enter_namespaces(plan.namespaces)
        confine.enter_private_root(plan.root)
        if plan.namespaces & libc.CLONE_NEWUTS:
            confine.set_hostname()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            channel.close()
            worker_main(go, err_w, plan)
        go.close()
        os.close(err_w)
        report = _wait_for(pid, err_r)
        outbox = _take_outbox(channel)
        if outbox is not None and report.wait_status is not None and _has_out_dir():
            collect_outputs(outbox, plan)
        elif outbox is not None:
            os.close(outbox)
        _init_exit(channel, report)
    except BaseException as exc:
        _init_exit(channel, protocol.InitReport(error=f"run init failed: {exc}"))


def _init_exit(channel: socket.socket, report: protocol.InitReport) -> None:
    try:
        outbox = _take_outbox(channel)  # on the error paths: see _take_outbox
        if outbox is not None:
            os.close(outbox)
        protocol.send(channel, report)
    finally:
        os._exit(0)


def _wait_for(pid: int, err_r: int) -> protocol.InitReport:
    """Reap everything (orphans land here) until the worker is gone; report how it ended."""
    while True:
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            break
    error = os.read(err_r, MAX_ERROR).decode(errors="replace")
    if error:
        return protocol.InitReport(error=f"confinement failed: {error}")
    return protocol.InitReport(wait_status=status)


def _has_out_dir() -> bool:
    """Most programs leave no out/: then there is nothing to kill, drop or walk (a daemon
    that makes one later dies with this init, its files uncollected)."""
    try:
        return stat.S_ISDIR(os.lstat(f"{WORKDIR}/{protocol.OUT_DIR}").st_mode)
    except OSError:
        return False


def _take_outbox(channel: socket.socket) -> int | None:
    """Read the zygote's outbox message, if it came. Always, before init exits: a unix
    socket closed with unread data resets its peer, and the peer's next read then fails
    with ECONNRESET even though this init's report is queued before it."""
    channel.setblocking(False)
    try:
        raw, fds = protocol.receive(channel, max_fds=1)
    except (BlockingIOError, protocol.ProtocolError):
        return None
    finally:
        channel.setblocking(True)
    if not fds:
        return None
    try:
        protocol.decode_outbox_message(raw)
    except protocol.ProtocolError:
        os.close(fds[0])
        return None
    return _lift(fds[0])


def collect_outputs(outbox: int, plan: RunPlan) -> None:
    """Bring back the regular files the program left under out/, into the client's outbox.

    Whatever the program left running is killed first, so nothing changes underneath; then
    init takes the run's own uid (no capability, no more rights than the program had) and
    walks out/ one directory descriptor at a time, never following a symlink, never
    reading a hard-linked file, a FIFO or a device."""
    if os.getpid() == 1:  # kill(-1) reaches only this run's processes from its pid 1;
        # anywhere else (a zygote configured without pid namespaces) it would reach the host
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    confine.drop_identity(plan.root.run_uid, plan.root.run_gid)
    confine.drop_capabilities()
    collected = _Collector(plan.max_out_files, plan.max_out_bytes)
    try:
        root = os.open(f"{WORKDIR}/{protocol.OUT_DIR}",
                       os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        root = -1  # no out/ (or not a directory): no files
    if root >= 0:
        collected.walk(root, "", 1)
    content = protocol.OutboxContent(files=collected.files, truncated=collected.truncated)
    view = memoryview(msgspec.msgpack.encode(content))
    while view:
        view = view[os.write(outbox, view):]
    os.close(outbox)


class _Collector:
    def __init__(self, max_files: int, max_bytes: int) -> None:
        self.files: list[protocol.OutputFile] = []
        self.truncated = False
        self.max_files = max_files
        self.budget = max_bytes
        # Names looked at, in all: a tmpfs holds millions of empty files in a few MiB.
        self.entries_left = MAX_OUT_ENTRIES

    def walk(self, directory: int, prefix: str, depth: int) -> None:
        try:
            with os.scandir(directory) as entries:
                names = sorted(e.name for e in itertools.islice(entries, self.entries_left + 1))
        except OSError:
            self.truncated = True
            names = []
        if len(names) > self.entries_left:
            self.truncated = True
        for name in names[:self.entries_left]:
            self.entries_left -= 1
            self._entry(directory, name, f"{prefix}{name}", depth)
        os.close(directory)

    def _entry(self, directory: int, name: str, path: str, depth: int) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(name, flags, dir_fd=directory)
        except OSError:
            self.truncated = True  # a symlink (ELOOP), or unreadable
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and depth < protocol.MAX_PATH_DEPTH:
            self.walk(fd, f"{path}/", depth + 1)
            return
        wanted = stat.S_ISREG(st.st_mode) and st.st_nlink == 1  # never a planted hard link
        fits = len(self.files) < self.max_files and st.st_size <= self.budget
        try:
            if wanted and fits:
                self._read(fd, path)
            else:
                self.truncated = True
        finally:
            os.close(fd)

    def _read(self, fd: int, path: str) -> None:
        data = bytearray()
        while len(data) <= self.budget:
            chunk = os.read(fd, min(65536, self.budget + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        if len(data) > self.budget:
            self.truncated = True
            return
        self.budget -= len(data)
        self.files.append(protocol.OutputFile(path, bytes(data)))


def worker_steps(plan: RunPlan, keep: set[int]) -> list[tuple[str, Callable[[], None]]]:
    """The worker's confinement, in order, applied before the request arrives so that none
    of it is on a request's path. Tests switch single steps off by name."""
    return [
        ("rlimits", lambda: apply_rlimits(plan, plan.limit_ceiling)),
        ("identity", lambda: confine.drop_identity(plan.root.run_uid, plan.root.run_gid)),
        ("securebits", confine.lock_securebits),
        ("capabilities", confine.drop_capabilities),
        ("no_new_privs", confine.set_no_new_privs),
        ("seccomp", lambda: confine.load_seccomp_filter(plan.seccomp_program,
                                                        plan.seccomp_buffer)),
        ("fds", lambda: confine.close_inherited_fds(keep)),
        ("environment", confine.reset_environment),
    ]


def apply_rlimits(plan: RunPlan, limits: Limits) -> None:
    confine.apply_rlimits(limits, plan.rlimit_nofile, plan.rlimit_nproc, plan.rlimit_stack_mib)


def worker_main(go: socket.socket, err_w: int, plan: RunPlan) -> None:
    """The run's worker: confines itself, waits for its program, becomes it. Never returns."""
    step = "start"
    try:
        err_w = _lift(err_w)
        for step, apply in worker_steps(plan, {go.fileno(), err_w}):  # noqa: B007 - reported
            apply()
        step = "go"
        raw, fds = protocol.receive(go, max_fds=len(protocol.WORKER_FDS))
        if not raw:
            os._exit(0)  # the zygote went away before this run was used
        limits = protocol.decode_go(raw).limits
        if len(fds) != len(protocol.WORKER_FDS):
            raise protocol.ProtocolError("go without the run's descriptors")
        step = "request limits"
        apply_rlimits(plan, limits)  # only ever lowers what the ceiling allowed
        step = "stdio"
        payload_fd, stdin_fd, stdout_fd, stderr_fd = (_lift(fd) for fd in fds)
        for target, fd in ((0, stdin_fd), (1, stdout_fd), (2, stderr_fd)):
            os.dup2(fd, target)
            os.close(fd)
        go.close()  # everything else was closed by the "fds" step
        step = "payload"
        payload = _read_payload(payload_fd, plan.max_payload_bytes)
        os.close(payload_fd)
        _write_workdir(payload)
        step = "program"
        _execute(payload, err_w)
    except BaseException as exc:
        os.write(err_w, f"{step}: {exc!r}".encode()[:MAX_ERROR])
    finally:
        os._exit(SETUP_FAILED)  # never fall back into init's or the zygote's code


def _lift(fd: int) -> int:
    """Move `fd` clear of 0-2: init closed everything, so any descriptor may sit there."""
    lifted = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return lifted


def _read_payload(fd: int, cap: int) -> protocol.Payload:
    size = os.fstat(fd).st_size
    if size > cap:
        raise protocol.ProtocolError(f"payload of {size} bytes exceeds the {cap} byte cap")
    return protocol.decode_payload(os.pread(fd, size, 0))


def _write_workdir(payload: protocol.Payload) -> None:
    """Write the program and its files into the fresh workdir (names were checked on decode)."""
    files = [(protocol.CODE_FILE, payload.code.encode()), *(
        (f.name, f.content) for f in payload.files)]
    for name, content in files:
        if "/" in name:
            os.makedirs(os.path.dirname(name), mode=0o755, exist_ok=True)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def _reseed() -> None:
    # `random` reseeds itself at fork; numpy's legacy global generator does not.
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def _install_stdio() -> None:
    """Fresh streams on the run's 0-2, buffered the way CPython buffers pipes."""
    streams = (
        open(0, encoding="utf-8", closefd=False),  # noqa: SIM115
        open(1, "w", encoding="utf-8", closefd=False),  # noqa: SIM115
        open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False),  # noqa: SIM115
    )
    for name, stream in zip(("stdin", "stdout", "stderr"), streams, strict=True):
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _execute(payload: protocol.Payload, err_w: int) -> None:
    """Run the program as `python main.py ARGS` would, then exit with its status."""
    _install_stdio()
    _reseed()
    path = f"{WORKDIR}/{protocol.CODE_FILE}"
    sys.argv = [protocol.CODE_FILE, *payload.args]
    sys.path[0] = WORKDIR
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    os.close(err_w)  # from here on, what goes wrong is the program's doing
    code = 0
    try:
        exec(compile(payload.code, path, "exec"), module.__dict__)  # noqa: S102 - the point
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        trimmed = exc.__traceback__.tb_next if exc.__traceback__ else None  # drop our frame
        sys.excepthook(type(exc), exc.with_traceback(trimmed), trimmed)
        code = 1
    _finish(code)


def _finish(code: int) -> None:
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()  # join non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # the reader may be gone; exit anyway
            stream.flush()
    os._exit(code)
