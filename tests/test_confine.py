"""Each confinement step, alone, in a real forked child: it guarantees what its name says."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stockade.limits import Limits
from stockade.sandbox import collector, confine, libc, seccomp, zygote
from stockade.sandbox.config import RUN_ENVIRONMENT
from stockade.sandbox.plan import RunPlan
from support.sandbox import make_config

REPORT_FD: list[int] = []  # the child's report pipe, for bodies that close descriptors


def in_child(body: Callable[[], Any]) -> Any:
    """Run `body` in a forked child and return what it returned (JSON), or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        REPORT_FD[:] = [w]
        try:
            os.close(r)
            out = json.dumps({"value": body()})
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read())
    os.waitpid(pid, 0)
    assert "error" not in data, data.get("error")
    return data["value"]


def status() -> dict[str, str]:
    lines = open("/proc/self/status").read().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def test_drop_identity() -> None:
    def body() -> Any:
        confine.drop_identity(61234, 61235)
        return [os.getresuid(), os.getresgid(), os.getgroups()]
    assert in_child(body) == [[61234] * 3, [61235] * 3, []]


def test_lock_securebits() -> None:
    def body() -> Any:
        confine.lock_securebits()
        return libc.prctl(libc.PR_GET_SECUREBITS)
    assert in_child(body) == confine.SECUREBITS_LOCKED


def test_drop_capabilities_empties_every_set() -> None:
    def body() -> Any:
        confine.drop_capabilities()
        s = status()
        return {k: int(s[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert set(in_child(body).values()) == {0}


def test_drop_capabilities_reads_cap_last_cap() -> None:
    assert confine.last_capability() == int(open("/proc/sys/kernel/cap_last_cap").read())


def test_set_no_new_privs() -> None:
    def body() -> Any:
        confine.set_no_new_privs()
        return status()["NoNewPrivs"]
    assert in_child(body) == "1"


def syscall_under_seccomp(*args: int) -> Any:
    """In a child under the real filter: [Seccomp status, syscall result, errno]."""
    program = seccomp.build_program()
    buffer = ctypes.create_string_buffer(program, len(program))

    def body() -> Any:
        confine.set_no_new_privs()
        confine.load_seccomp_filter(program, buffer)
        libc_ = ctypes.CDLL(None, use_errno=True)
        rc = libc_.syscall(*(ctypes.c_long(a) for a in args))
        return [status()["Seccomp"], rc, ctypes.get_errno()]
    return in_child(body)


def test_load_seccomp_filter_refuses_with_eperm() -> None:
    assert syscall_under_seccomp(101, 0, 0, 0, 0) == ["2", -1, errno.EPERM]  # ptrace


def test_seccomp_program_is_default_deny_for_unknown_numbers() -> None:
    # A number beyond every allowed call.
    assert syscall_under_seccomp(460) == ["2", -1, errno.EPERM]


def test_apply_rlimits() -> None:
    def body() -> Any:
        confine.apply_rlimits(Limits(cpu_time_s=0.3, file_size_kib=7), 32, 40, 4)
        return [resource.getrlimit(r) for r in (
            resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
            resource.RLIMIT_NPROC, resource.RLIMIT_STACK, resource.RLIMIT_CORE)]
    assert in_child(body) == [[1, 2], [7168, 7168], [32, 32], [40, 40], [4 << 20] * 2, [0, 0]]


def test_close_inherited_fds_keeps_only_what_is_asked() -> None:
    def body() -> Any:
        keep = os.open("/dev/null", os.O_RDONLY)
        os.open("/dev/null", os.O_RDONLY)
        confine.close_inherited_fds({0, 1, 2, keep, *REPORT_FD})
        left = {int(fd) for fd in os.listdir("/proc/self/fd")} - {keep, *REPORT_FD}
        return sorted(left)
    # 0-2 and listdir's own descriptor (the highest) remain; the unkept one is gone.
    value = in_child(body)
    assert value[:3] == [0, 1, 2] and len(value) == 4


def test_reset_environment() -> None:
    def body() -> Any:
        os.environ["SECRET_TOKEN"] = "hunter2"
        confine.reset_environment()
        return [dict(os.environ), b"hunter2" in open("/proc/self/environ", "rb").read()]
    os.environ["STOCKADE_TEST_PARENT_SECRET"] = "x"
    try:
        environ, leaked = in_child(body)
    finally:
        del os.environ["STOCKADE_TEST_PARENT_SECRET"]
    assert environ == RUN_ENVIRONMENT and not leaked


def test_a_zygote_without_its_runs_init_refuses_to_start(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zygote, "INIT_PROGRAM", ("/nonexistent/catatonit", "-P"))
    with pytest.raises(FileNotFoundError, match="every run's init is catatonit"):
        zygote.Zygote(make_config(str(tmp_path), "noinit"))


def test_the_runs_proc_falls_back_to_what_an_older_kernel_takes() -> None:
    """Before 5.8 the kernel refuses subset=pid and hidepid=invisible with EINVAL."""
    tried: list[str] = []

    def old_kernel(_source: str, _target: str, _fstype: str, _flags: int, options: str) -> None:
        tried.append(options)
        if options != "hidepid=2":
            raise OSError(errno.EINVAL, "unknown option")

    assert confine.mount_run_proc("/proc", mount=old_kernel) == "hidepid=2"
    assert tried == list(confine.RUN_PROC_OPTIONS)

    def no_proc_at_all(_source: str, _target: str, _fstype: str, _flags: int,
                       _options: str) -> None:
        raise OSError(errno.EPERM, "not allowed")

    with pytest.raises(PermissionError):  # any other error is not a reason to give up less
        confine.mount_run_proc("/proc", mount=no_proc_at_all)


def test_the_out_collector_is_confined_like_a_run() -> None:
    program = seccomp.build_program()
    root = confine.RootPlan(mount_point="/nonexistent", ro_paths=(), run_uid=61234,
                            run_gid=61234, workdir_size_mib=1, tmp_size_mib=1, shm_size_mib=1)
    plan = RunPlan(root=root, root_template_fd=-1, namespaces=0, seccomp_program=program,
                   seccomp_buffer=ctypes.create_string_buffer(program, len(program)),
                   rlimit_nofile=256, rlimit_nproc=512, rlimit_stack_mib=8,
                   max_payload_bytes=1 << 20, limit_ceiling=Limits(), max_out_files=16,
                   max_out_bytes=1 << 20)

    def body() -> Any:
        stray = os.open("/dev/null", os.O_RDONLY)  # what the zygote may have had open
        collector.confine_collector(plan, keep=set(REPORT_FD))
        seen = status()
        try:
            os.fstat(stray)
            stray_open = True
        except OSError:
            stray_open = False
        return {"uid": seen["Uid"], "caps": [seen[k] for k in ("CapPrm", "CapEff", "CapBnd")],
                "nnp": seen["NoNewPrivs"], "seccomp": seen["Seccomp"], "stray": stray_open}
    seen = in_child(body)
    assert seen["uid"].split() == ["61234"] * 4 and not seen["stray"]
    assert all(int(cap, 16) == 0 for cap in seen["caps"])
    assert (seen["nnp"], seen["seccomp"]) == ("1", "2")
