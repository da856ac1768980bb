"""Nothing one run writes or starts is there for the next run, or left on the host."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from stockade.runner.front import zygote_client as client
from stockade.sandbox.cgroups import CgroupDriver
from stockade.sandbox.zygote import EXIT_UNCLEAN
from support.leftovers import host_processes_of, leftovers_seen
from support.sandbox import Sandbox, make_config


def test_nothing_survives_a_run(sandbox: Sandbox) -> None:
    assert leftovers_seen(sandbox) == []


def test_stopping_a_zygote_mid_stream_leaves_no_cgroup_or_process(tmp_path: Path) -> None:
    box = Sandbox(make_config(str(tmp_path), "leakcheck"))
    assert box.run("print(1)").status == "ok"  # a finished run and a prepared next one
    box.close()  # SIGTERM while the next run is being prepared
    left = [str(p) for p in Path("/sys/fs/cgroup").glob("*/stockade/leakcheck-*")]
    left += [str(p) for p in Path("/sys/fs/cgroup").glob("stockade/leakcheck-*")]
    assert left == [] and host_processes_of(box.config.run_uid) == []


def test_a_killed_zygote_takes_its_prepared_run_with_it(tmp_path: Path) -> None:
    """The prepared worker has dropped to the run's uid, which clears the parent-death
    signal; it sets it again, so a zygote that dies leaves no process of the run's uid.
    Its init (catatonit, root, alone in the run's pid namespace) has no parent-death
    signal: a killed zygote leaves it, and this test removes it."""
    box = Sandbox(make_config(str(tmp_path), "killcheck"))
    uid = box.config.run_uid
    inits: list[int] = []
    try:
        assert box.run("print(1)").status == "ok"  # the next run is now prepared and waiting
        process = box.process.proc
        assert process is not None
        deadline = time.monotonic() + 5
        while not host_processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.01)  # the prepared worker drops to the run's uid as it confines
        workers = host_processes_of(uid)
        assert len(workers) == 1
        inits = [pid for pid in _children(process.pid)
                 if Path(f"/proc/{pid}/comm").read_text().strip() == "catatonit"
                 and os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(
                     f"/proc/{workers[0]}/ns/pid")]
        assert len(inits) == 1  # the prepared run's init: pid 1 of the worker's namespace
        process.kill()
        process.wait()
        deadline = time.monotonic() + 5
        while host_processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_of(uid) == []
    finally:
        for pid in inits:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        box.close()
        CgroupDriver(box.config.cgroup_parent).sweep("killcheck-", timeout_s=2.0)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_zygote_that_cannot_prove_a_run_gone_exits(
        weak_sandbox: Callable[[str], Sandbox]) -> None:
    """Fail closed: the answer goes out, then the zygote exits rather than serve again."""
    box = weak_sandbox("unreapable")
    assert box.run("print(1)").status == "ok"
    assert not client.await_idle(box.sock, 30)  # no Idle: its end of the connection closes
    proc = box.process.proc
    assert proc is not None
    assert proc.wait(timeout=30) == EXIT_UNCLEAN


def test_the_zygote_says_idle_once_each_run_is_proven_gone(sandbox: Sandbox) -> None:
    """A failed program, a killed one and a clean one: each report is followed by Idle."""
    for code, status in (("raise SystemExit(3)", "runtime_error"),
                         ("while True: pass", "time_limit"), ("print(1)", "ok")):
        assert sandbox.run(code, cpu_time_s=0.5).status == status
        assert client.await_idle(sandbox.sock, 10), code
