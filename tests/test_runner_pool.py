"""The pool under load and abuse: concurrency, containers kept through failed programs and
replaced on evidence while clean runs go on, admission control."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec

from stockade.result import Result
from stockade.runner.local import NginxProcess, RunnerProcess


def metric(runner: RunnerProcess, name: str) -> float:
    return runner.metric(name)


def wait_for_full_pool(runner: RunnerProcess) -> None:
    runner.wait_for_full_pool(runner.config.all_containers)


def test_64_concurrent_requests_through_nginx(nginx: NginxProcess,
                                              runner: RunnerProcess) -> None:
    def one(i: int) -> tuple[int, int, str]:
        answer = nginx.post("/v1/runs", {"code": f"print({i} * 2)"}, timeout=120)
        stdout = ""
        if answer.status == 200:
            stdout = msgspec.json.decode(answer.body, type=Result).stdout
        return i, answer.status, stdout

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(one, range(64)))
    # The wait queue is sized from the pool, so a burst this size is all served.
    assert [status for _, status, _ in answers] == [200] * 64, answers
    assert all(out == f"{i * 2}\n" for i, _, out in answers), answers


def test_clean_runs_go_on_while_dirty_containers_are_replaced(runner: RunnerProcess) -> None:
    wait_for_full_pool(runner)
    recycled = metric(runner, "stockade_pool_recycled_total")
    # A signal the zygote did not send is the evidence that retires a container.
    signaled = [runner.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
                for _ in range(2)]
    assert [r.status for r in signaled] == ["signaled"] * 2, [r.message for r in signaled]
    for i in range(10):  # the pool refills in the background; these must not fail
        result = runner.run(f"print({i})")
        assert (result.status, result.stdout) == ("ok", f"{i}\n"), result.message
    assert metric(runner, "stockade_pool_recycled_total") >= recycled + 2
    assert metric(runner, 'stockade_recycles_total{reason="signaled"}') >= 2
    wait_for_full_pool(runner)
    assert metric(runner, "stockade_pool_last_recycle_seconds") > 0


def test_runs_naming_a_preloaded_module_get_a_container_that_preloaded_it(
        runner: RunnerProcess) -> None:
    # The probe spells the names in halves, so only the comment below routes it.
    probe = ("import sys\n"
             "print(sorted(m for m in ('num' + 'py', 'pan' + 'das') if m in sys.modules))")
    full = runner.run(probe + "\n# uses pandas")
    lean = runner.run(probe)
    assert (full.stdout, lean.stdout) == ("['numpy', 'pandas']\n", "[]\n")
    helper = runner.run("import helper\nprint(helper.total())",
                        files=[{"name": "helper.py", "content": "import pandas as pd\n"
                                "def total(): return pd.Series([2, 3]).sum()"}])
    assert (helper.status, helper.stdout) == ("ok", "5\n"), helper.stderr


def test_a_failed_program_keeps_its_container_and_a_foreign_signal_does_not(
        runner: RunnerProcess) -> None:
    """A program's own failure, a limit it hit, even a fork bomb: its zygote proved it gone,
    so the container serves on. A signal nobody in stockade sent retires it."""
    wait_for_full_pool(runner)
    before = set(runner.containers())
    failures = [runner.run("raise SystemExit(1)"), runner.run("1/0"),
                runner.run("while True: pass", cpu_time_s=0.5),
                runner.run("b = bytearray(300 << 20)", memory_mib=64),
                runner.run("import os\nwhile True: os.fork()", processes=32),
                runner.run("print(1)")]
    assert [r.status for r in failures] == ["runtime_error", "runtime_error", "time_limit",
                                            "memory_limit", "runtime_error", "ok"], failures
    wait_for_full_pool(runner)
    assert set(runner.containers()) == before, "a failed program must keep its container"
    assert runner.run("import os\nos.abort()").status == "signaled"
    wait_for_full_pool(runner)
    after = set(runner.containers())
    assert len(before - after) == 1 and len(after) == runner.config.all_containers, (before, after)


def test_a_zygote_gone_while_idle_costs_no_run(runner: RunnerProcess) -> None:
    """A container whose zygote exited (it fails closed) is skipped and replaced; every
    run is still served."""
    wait_for_full_pool(runner)
    lean = [name for name in runner.containers() if "-lean-" in name]
    for _ in range(2 * len(lean)):  # every lean container holds a connection now
        assert runner.run("print(1)").status == "ok"
    victim = lean[0]

    def lxc_info(flag: str) -> str:
        return subprocess.run(["lxc-info", "-P", runner.config.lxc_path, "-n", victim, flag,
                               "-H"], capture_output=True, text=True, check=True).stdout.strip()

    os.kill(int(lxc_info("-p")), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while lxc_info("-s") != "STOPPED":  # its zygote's end of the connection is closed
        assert time.monotonic() < deadline, "the killed container did not stop"
        time.sleep(0.05)
    results = [runner.run("print(1)") for _ in range(2 * len(lean))]
    assert [r.status for r in results] == ["ok"] * len(results), [r.message for r in results]
    wait_for_full_pool(runner)
    assert victim not in runner.containers()
