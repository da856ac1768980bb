"""The pool under load and abuse: concurrency, dirty containers recycled while clean runs
go on, admission control."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import msgspec

from stockade.result import Result
from support.service import NginxProcess, RunnerProcess


def metric(runner: RunnerProcess, name: str) -> float:
    for line in runner.get("/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def wait_for_full_pool(runner: RunnerProcess, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(runner, "stockade_pool_idle") < runner.config.pool_size:
        assert time.monotonic() < deadline, "the pool did not refill"
        time.sleep(0.05)


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
    ok = [(i, out) for i, status, out in answers if status == 200]
    others = [status for _, status, _ in answers if status != 200]
    assert all(out == f"{i * 2}\n" for i, out in ok), ok
    assert set(others) <= {503}, others
    assert len(ok) >= runner.config.queue_limit, (len(ok), others)


def test_clean_runs_go_on_while_dirty_containers_are_replaced(runner: RunnerProcess) -> None:
    wait_for_full_pool(runner)
    recycled = metric(runner, "stockade_pool_recycled_total")
    bomb = runner.run("import os\nwhile True: os.fork()", processes=32)
    oom = runner.run("b = bytearray(300 << 20)", memory_mib=64)
    assert (bomb.status, oom.status) == ("runtime_error", "memory_limit")
    for i in range(10):  # the pool refills in the background; these must not fail
        result = runner.run(f"print({i})")
        assert (result.status, result.stdout) == ("ok", f"{i}\n"), result.message
    assert metric(runner, "stockade_pool_recycled_total") >= recycled + 2
    wait_for_full_pool(runner)
    assert metric(runner, "stockade_pool_last_recycle_seconds") > 0


def test_a_dirty_container_is_replaced_and_a_clean_one_kept(runner: RunnerProcess) -> None:
    wait_for_full_pool(runner)
    before = set(runner.containers())
    assert runner.run("print(1)").status == "ok"
    wait_for_full_pool(runner)
    assert set(runner.containers()) == before, "a clean run must keep its container"
    assert runner.run("raise SystemExit(1)").status == "runtime_error"
    wait_for_full_pool(runner)
    after = set(runner.containers())
    assert len(before - after) == 1 and len(after) == runner.config.pool_size, (before, after)
