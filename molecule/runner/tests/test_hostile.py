"""Hostile programs through nginx get the right status, and the host keeps serving."""

from __future__ import annotations

from api import post_run
from conftest import Caller


def test_a_blocked_syscall_is_refused_with_eperm(caller: Caller) -> None:
    code = ("import ctypes, errno\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.syscall(101, 0, 0, 0, 0), errno.errorcode[ctypes.get_errno()])\n"
            "import socket\n"
            "try:\n    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
            "except PermissionError as exc:\n    print('netlink', exc.errno)\n")
    record = post_run(caller, code)
    assert record["status"] == "ok", record
    assert record["stdout"].splitlines() == ["-1 EPERM", "netlink 1"]  # ptrace, AF_NETLINK


def test_out_of_memory_is_memory_limit(caller: Caller) -> None:
    # All the time there is: under qemu's TCG (the image test) the page faults and the
    # reclaim before the OOM kill can take more than the default 2 s of CPU.
    record = post_run(caller, "b = bytearray(400 << 20)", memory_mib=128, cpu_time_s=10,
                      wall_time_s=20)
    assert record["status"] == "memory_limit", record


def test_fork_bomb_is_stopped_by_the_pids_cap(caller: Caller) -> None:
    record = post_run(caller, "import os\nwhile True: os.fork()", processes=16)
    assert record["status"] == "runtime_error", record
    assert "BlockingIOError" in record["stderr"]


def test_cpu_spin_is_time_limit(caller: Caller) -> None:
    record = post_run(caller, "while True: pass", cpu_time_s=0.5)
    assert record["status"] == "time_limit", record


def test_clean_runs_follow_the_hostile_ones(caller: Caller) -> None:
    """Nothing a hostile run did is left for the next, in the same container or a new one."""
    for i in range(4):
        record = post_run(caller, f"print({i})")
        assert (record["status"], record["stdout"]) == ("ok", f"{i}\n"), record
