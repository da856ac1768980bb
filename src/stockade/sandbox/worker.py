"""A run's worker: forked from the zygote into the run's pid namespace, it confines itself
and becomes the program.

It is prepared before the request arrives, under the run's init (`family.py`): it joins
the run's cgroup, unshares the other namespaces in a private copy of the zygote's root
template, mounts the run's own /proc and tmpfs, confines itself step by step and waits.
On "go" it lowers its rlimits to the request's, takes its stdio and runs the program
in-process. When the worker ends, the zygote kills the init, and with it whatever the
program left in the namespace.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import fcntl
import os
import signal
import socket
import sys
import traceback
import types
from collections.abc import Callable

from stockade import protocol
from stockade.limits import Limits
from stockade.sandbox import confine, libc
from stockade.sandbox.config import WORKDIR
from stockade.sandbox.plan import RunPlan

SETUP_FAILED = 125  # the worker's exit code when confinement failed (the pipe says why)
MAX_ERROR = 4000


def _reset_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the zygote forks with some blocked


def worker_steps(plan: RunPlan, keep: set[int]) -> list[tuple[str, Callable[[], None]]]:
    """The worker's confinement, in order, applied before the request arrives so that none
    of it is on a request's path. Tests switch single steps off by name."""
    return [
        ("rlimits", lambda: apply_rlimits(plan, plan.limit_ceiling)),
        ("identity", lambda: _take_run_identity(plan)),
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


def _take_run_identity(plan: RunPlan) -> None:
    confine.drop_identity(plan.root.run_uid, plan.root.run_gid)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change cleared it


def _enter_run(go: socket.socket, err_w: int, cgroup_procs: list[int], plan: RunPlan) -> None:
    """The run's cgroup, namespaces and private root; then the workdir goes to the zygote,
    which brings back out/ from it after the run."""
    for fd in cgroup_procs:
        os.write(fd, b"0")
    confine.volunteer_for_oom()
    confine.close_inherited_fds({go.fileno(), err_w, plan.root_template_fd})
    confine.join_root_template(plan.root_template_fd)
    confine.enter_namespaces(plan.namespaces)
    confine.enter_private_root(plan.root)
    if plan.namespaces & libc.CLONE_NEWUTS:
        confine.set_hostname()
    workdir = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    protocol.send(go, protocol.Workdir(), [workdir])
    os.close(workdir)


def worker_main(go: socket.socket, err_w: int, cgroup_procs: list[int], plan: RunPlan) -> None:
    """The run's worker, pid 2 of its pid namespace: enters the run, confines itself, waits
    for its program and becomes it. Never returns."""
    step = "start"
    try:
        _reset_signals()
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # no zygote, no run
        step = "run namespaces and root"
        _enter_run(go, err_w, cgroup_procs, plan)
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
        os._exit(SETUP_FAILED)  # never fall back into the zygote's code


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
