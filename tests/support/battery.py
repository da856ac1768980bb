"""The hostile battery: programs that try to escape or exhaust, each with its exact expectation.

A probe's `check` raises AssertionError when confinement failed. The battery test runs
every probe against a normal zygote; the layer tests run chosen probes against a zygote
with one layer switched off and require `check` to fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from stockade.result import Result
from stockade.sandbox.config import RUN_ENVIRONMENT
from stockade.sandbox.confine import SECUREBITS_LOCKED

# Shared prelude: call a raw x86_64 syscall and print the errno name (or "ok").
PRELUDE = """
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def sc(*args):
    r = libc.syscall(*[ctypes.c_long(a) for a in args])
    return "ok" if r != -1 else errno.errorcode[ctypes.get_errno()]
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
"""


@dataclass
class Context:
    """Things on the host side that probes try to reach."""

    tcp4_port: int = 0
    tcp6_port: int = 0
    abstract_name: str = ""
    msg_key: int = 0
    shm_file: str = ""


@dataclass
class Probe:
    name: str
    code: str
    check: Callable[[Result, Context], None]
    limits: dict[str, Any] = field(default_factory=dict)

    def source(self, ctx: Context) -> str:
        return PRELUDE + self.code.format(ctx=ctx)


def stdout_json(result: Result) -> Any:
    assert result.status == "ok", (result.status, result.message, result.stderr[-2000:])
    return json.loads(result.stdout)


def expect_status(status: str, **fields: Any) -> Callable[[Result, Context], None]:
    def check(result: Result, _ctx: Context) -> None:
        assert result.status == status, (result.status, result.message, result.stderr[-2000:])
        for name, value in fields.items():
            assert getattr(result, name) == value, (name, getattr(result, name))
    return check


def expect_output(expected: Any) -> Callable[[Result, Context], None]:
    def check(result: Result, _ctx: Context) -> None:
        assert stdout_json(result) == expected
    return check


def _errno_probe(name: str, call: str, expected: str = "EPERM") -> Probe:
    return Probe(name, f"print(json.dumps({call}))", expect_output(expected))


def _check_status_flags(result: Result, ctx: Context) -> None:
    seen = stdout_json(result)
    status = seen["status"]
    assert status["Uid"].split() == [str(seen["uid"])] * 4 and seen["uid"] >= 1000
    assert status["Gid"].split() == [str(seen["uid"])] * 4
    assert status["Groups"] == ""
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert seen["securebits"] == SECUREBITS_LOCKED


def _check_pids(result: Result, ctx: Context) -> None:
    # Its init (pid 1) is root's: the run's /proc hides every process but its own.
    assert stdout_json(result) == {"pid": 2, "pids": [2]}


def _check_fork_count(result: Result, ctx: Context) -> None:
    # processes=8: the program itself plus 7 children; the run's init is not counted.
    assert stdout_json(result) == {"count": 7, "error": "EAGAIN"}


def _check_fd_exhaustion(result: Result, ctx: Context) -> None:
    seen = stdout_json(result)
    assert seen["error"] == "EMFILE" and seen["opened"] <= 256, seen


def _check_rlimits(result: Result, ctx: Context) -> None:
    assert stdout_json(result) == {
        "RLIMIT_CPU": [2, 3], "RLIMIT_FSIZE": [1024 * 1024] * 2, "RLIMIT_NOFILE": [256, 256],
        "RLIMIT_NPROC": [512, 512], "RLIMIT_STACK": [8 << 20] * 2, "RLIMIT_CORE": [0, 0],
        "RLIMIT_MEMLOCK": [0, 0], "RLIMIT_MSGQUEUE": [0, 0], "RLIMIT_RTPRIO": [0, 0],
    }


BATTERY: list[Probe] = [
    Probe("cpu_spin", "while True: pass", expect_status("time_limit"), {"cpu_time_s": 0.5}),
    Probe("cpu_spin_in_many_processes", """
for _ in range(3):
    if os.fork() == 0:
        break
while True: pass
""", expect_status("time_limit"), {"cpu_time_s": 0.5, "wall_time_s": 10}),
    Probe("sleep_forever", "import time\ntime.sleep(1000)", expect_status("wall_time_limit"),
          {"wall_time_s": 0.5}),
    Probe("memory_bomb_bytearray", "b = bytearray(512 << 20)", expect_status("memory_limit"),
          {"memory_mib": 64}),
    Probe("memory_bomb_touched_mmap", """
import mmap
m = mmap.mmap(-1, 512 << 20)
for i in range(0, len(m), 4096):
    m[i] = 1
""", expect_status("memory_limit"), {"memory_mib": 64}),
    Probe("fork_bomb", "while True: os.fork()", expect_status("runtime_error", exit_code=1),
          {"processes": 8, "wall_time_s": 10}),
    Probe("fork_until_refused", """
import time
count = 0
try:
    while count < 2000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        count += 1
    print(json.dumps({{"count": count, "error": None}}))
except OSError as exc:
    print(json.dumps({{"count": count, "error": errno.errorcode[exc.errno]}}))
""", _check_fork_count, {"processes": 8}),
    Probe("stdout_flood", "while True: sys.stdout.write('x' * 65536)",
          expect_status("output_limit", stdout_truncated=True, stdout="x" * 65536),
          {"output_kib": 64}),
    Probe("stderr_flood", "while True: sys.stderr.write('x' * 65536)",
          expect_status("output_limit", stderr_truncated=True, stderr="x" * 65536),
          {"output_kib": 64}),
    Probe("disk_fill", """
with open("big", "wb") as f:
    while True:
        f.write(b"x" * (1 << 20))
""", expect_status("file_size_limit", signal="SIGXFSZ"), {"file_size_kib": 1024}),
    Probe("fd_exhaustion", """
opened, error = 0, None
try:
    while opened < 5000:
        os.open("/dev/null", os.O_RDONLY)
        opened += 1
except OSError as exc:
    error = errno.errorcode[exc.errno]
print(json.dumps({{"opened": opened, "error": error}}))
""", _check_fd_exhaustion),
    Probe("rlimits_in_force", """
import resource
names = ["RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK",
         "RLIMIT_CORE", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_RTPRIO"]
print(json.dumps({{n: list(resource.getrlimit(getattr(resource, n))) for n in names}}))
""", _check_rlimits, {"cpu_time_s": 1.5, "file_size_kib": 1024}),
    Probe("status_flags", """
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
status = {{k: v.strip() for k, v in status.items()}}
securebits = libc.prctl(27, 0, 0, 0, 0)
print(json.dumps({{"status": status, "uid": os.getuid(), "securebits": securebits}}))
""", _check_status_flags),
    _errno_probe("setuid_root", "attempt(lambda: os.setuid(0))"),
    _errno_probe("read_etc_shadow", "attempt(lambda: open('/etc/shadow').read())", "EACCES"),
    # the zygote's own proc, kept in the root template so that each run may mount one
    _errno_probe("zygote_proc_kept_from_run", "attempt(lambda: os.listdir('/.stockade/proc'))",
                 "EACCES"),
    Probe("zygote_proc_detached_from_run", """
print(json.dumps([line.split()[4] for line in open("/proc/self/mountinfo")
                  if line.split()[4].startswith("/.stockade")]))
""", expect_output([])),
    Probe("proc_shows_only_the_run", """
hidden = [p for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/kcore", "/proc/meminfo",
                      "/proc/stat", "/proc/1") if os.path.exists(p)]
print(json.dumps({{"visible": hidden, "write": attempt(lambda: open("/proc/self/comm", "w"))}}))
""", expect_output({"visible": [], "write": "EROFS"})),
    _errno_probe("write_outside_workdir", "[attempt(lambda p=p: open(p, 'w')) for p in "
                 "('/etc/stockade-probe', '/usr/stockade-probe', '/stockade-probe', "
                 "'/dev/stockade-probe')]",
                 ["EROFS", "EROFS", "EROFS", "EROFS"]),  # type: ignore[arg-type]
    _errno_probe("ptrace_traceme", "sc(101, 0, 0, 0, 0)"),
    _errno_probe("mount_tmpfs", "attempt(lambda: (libc.mount(b'none', b'/tmp', b'tmpfs', 0, "
                 "None) == 0) or (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'x')))"),
    _errno_probe("unshare_user_namespace", "sc(272, 0x10000000)"),
    _errno_probe("setns", "sc(308, 0, 0)"),
    _errno_probe("clone_with_namespace_flags", "sc(56, 0x10000000 | 17, 0, 0, 0, 0)"),
    _errno_probe("clone3_falls_back", "sc(435, 0, 0)", "ENOSYS"),
    _errno_probe("keyctl", "sc(250, 0, -3, 1)"),
    _errno_probe("add_key", "sc(248, 0, 0, 0, 0, 0)"),
    _errno_probe("io_uring_setup",
                 "sc(425, 1, ctypes.addressof(ctypes.create_string_buffer(120)))"),
    _errno_probe("bpf", "sc(321, 0, 0, 0)"),
    _errno_probe("perf_event_open", "sc(298, 0, 0, -1, -1, 0)"),
    _errno_probe("userfaultfd", "sc(323, 0)"),
    _errno_probe("process_vm_readv", "sc(310, 1, 0, 0, 0, 0, 0)"),
    _errno_probe("personality", "sc(135, 0xffffffff)"),
    _errno_probe("kexec_load", "sc(246, 0, 0, 0, 0)"),
    _errno_probe("init_module", "sc(175, 0, 0, 0)"),
    _errno_probe("x32_syscall", "sc(0x40000000 | 39)"),
    _errno_probe("ioctl_tiocsti", "sc(16, 0, 0x5412, 0)"),
    _errno_probe("ioctl_tiocsti_high_bits", "sc(16, 0, 0x100005412, 0)"),
    _errno_probe("socket_netlink", "attempt(lambda: __import__('socket').socket(16, 3, 0))"),
    _errno_probe("socket_vsock", "attempt(lambda: __import__('socket').socket(40, 1, 0))"),
    _errno_probe("socket_packet", "attempt(lambda: __import__('socket').socket(17, 3, 0))"),
    _errno_probe("tcp_to_host_loopback_v4", "attempt(lambda: __import__('socket')"
                 ".create_connection(('127.0.0.1', {ctx.tcp4_port}), timeout=2))"),
    _errno_probe("tcp_to_host_loopback_v6", "attempt(lambda: __import__('socket')"
                 ".create_connection(('::1', {ctx.tcp6_port}), timeout=2))"),
    _errno_probe("abstract_unix_socket_of_host", """attempt(lambda: __import__('socket').socket(
    1, 1).connect('\\0{ctx.abstract_name}'))""", "ECONNREFUSED"),
    _errno_probe("sysv_queue_of_host", "attempt(lambda: libc.msgget({ctx.msg_key}, 0) >= 0 "
                 "or (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'x')))", "ENOENT"),
    _errno_probe("dev_shm_of_host", "attempt(lambda: open('/dev/shm/{ctx.shm_file}'))",
                 "ENOENT"),
    Probe("sleep_resumes_after_stop_and_cont", """
class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
pid = os.fork()
if pid == 0:  # a relative sleep, as sleep(3): resumed through restart_syscall
    r = libc.nanosleep(ctypes.byref(timespec(0, 400_000_000)), None)
    os._exit(0 if r == 0 else ctypes.get_errno())
import signal, time
time.sleep(0.1)
os.kill(pid, signal.SIGSTOP)
time.sleep(0.1)
os.kill(pid, signal.SIGCONT)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(errno.errorcode.get(code, code) if code else "ok"))
""", expect_output("ok")),
    Probe("posix_timers", """
timer = ctypes.c_void_p()
made = libc.timer_create(1, None, ctypes.byref(timer)) == 0  # CLOCK_MONOTONIC
print(json.dumps("ok" if made and libc.timer_delete(timer) == 0
                 else errno.errorcode[ctypes.get_errno()]))
""", expect_output("ok")),
    Probe("hostname", "print(json.dumps(__import__('socket').gethostname()))",
          expect_output("sandbox")),
    Probe("sees_only_its_own_pids", """
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({{"pid": os.getpid(), "pids": pids}}))
""", _check_pids),
    Probe("no_inherited_fds", """
open_fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
print(json.dumps(open_fds))
""", expect_output([])),
    Probe("environment_whitelisted", "print(json.dumps(dict(os.environ)))",
          expect_output(RUN_ENVIRONMENT)),
    _errno_probe("zygote_environ_unreadable",
                 "attempt(lambda: open('/proc/self/environ', 'rb').read())", "EACCES"),
    _errno_probe("kill_everything", "attempt(lambda: os.kill(-1, 9))", "ESRCH"),
]

BY_NAME = {probe.name: probe for probe in BATTERY}


@contextmanager
def host_context() -> Iterator[Context]:
    """Listeners and objects on the host that no run may reach."""
    tcp4 = socket.create_server(("127.0.0.1", 0))
    tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    name = f"stockade-test-{uuid.uuid4().hex}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + name)
    abstract.listen(4)
    libc = ctypes.CDLL(None, use_errno=True)
    key = int(uuid.uuid4().hex[:7], 16)
    queue = libc.msgget(key, 0o1000 | 0o666)  # IPC_CREAT
    assert queue >= 0, os.strerror(ctypes.get_errno())
    shm_file = f"stockade-test-{uuid.uuid4().hex}"
    shm_path = f"/dev/shm/{shm_file}"
    with open(shm_path, "w") as f:
        f.write("host secret")
    try:
        yield Context(tcp4.getsockname()[1], tcp6.getsockname()[1], name, key, shm_file)
    finally:
        for sock in (tcp4, tcp6, abstract):
            sock.close()
        libc.msgctl(queue, 0, None)  # IPC_RMID
        os.unlink(shm_path)


