"""Admission control, draining on SIGTERM (sessions included), and a crash (SIGKILL)
followed by a restart that reconciles what was left: each on a runner of its own."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stockade.runner import local
from stockade.runner.config import SessionPolicy
from stockade.runner.local import RunnerProcess
from support.leftovers import runner_leftovers
from support.runners import own_runner

PORT = 18090


@pytest.fixture
def small_runner() -> Iterator[RunnerProcess]:
    config = local.runner_config(PORT, "stockade-l-", pool_size=1, lean_pool_size=0,
                                   queue_limit=1,
                                   queue_timeout_s=1.0)
    with own_runner(config) as process:
        yield process


def test_saturation_answers_503_with_retry_after(small_runner: RunnerProcess) -> None:
    slow = {"code": "import time\ntime.sleep(2.5)"}
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(small_runner.post, "/v1/runs", slow)
        time.sleep(0.5)  # the only container is busy now
        waiting = pool.submit(small_runner.post, "/v1/runs", slow)
        time.sleep(0.2)  # ...and the only place in the queue is taken
        refused = small_runner.post("/v1/runs", slow)
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "saturated"
        assert running.result().status == 200
        timed_out = waiting.result()  # waited 1 s (queue_timeout_s) for the container
        assert timed_out.status == 503 and "retry" in timed_out.json()["error"]["message"]
    assert small_runner.metric('stockade_rejected_total{reason="queue_full"}') == 1


def test_sigterm_drains_the_run_in_flight(small_runner: RunnerProcess) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(small_runner.run, "import time\ntime.sleep(1.5)\nprint('done')")
        time.sleep(0.5)
        code = small_runner.stop(signal.SIGTERM)
        result = run.result()
    assert (result.status, result.stdout) == ("ok", "done\n")
    assert code == 0, small_runner.log()
    assert "draining" in small_runner.log()


def test_sigkill_mid_run_then_restart_leaves_nothing(small_runner: RunnerProcess) -> None:
    config = small_runner.config
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(small_runner.post, "/v1/runs", {"code": "import time\ntime.sleep(30)"})
        time.sleep(0.5)
        assert small_runner.proc is not None
        os.kill(small_runner.proc.pid, signal.SIGKILL)  # the privileged manager crashes
        small_runner.proc.wait()
        with pytest.raises(OSError):
            run.result()  # the front died with it (PDEATHSIG): the client sees a reset
    assert runner_leftovers(config), "a crash leaves containers behind for the restart"
    small_runner.start()
    assert "previous runner left" in small_runner.log()
    assert small_runner.run("print('after the crash')").stdout == "after the crash\n"
    assert small_runner.stop() == 0
    assert not runner_leftovers(config)


def test_a_pool_that_overcommits_the_host_is_refused_and_leaves_nothing() -> None:
    host_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    config = local.runner_config(PORT, "stockade-l-", pool_size=1, lean_pool_size=0,
                                 pool_memory_mib=host_mib)
    process = RunnerProcess(config)
    try:
        with pytest.raises(local.LocalServiceError, match="the runner exited"):
            process.start()
        assert process.stop() == 2
        assert "more than this host's" in process.log()
        assert not runner_leftovers(config)
    finally:
        process.close()


def test_sigterm_with_live_sessions_ends_them_and_leaves_nothing() -> None:
    """A stopping runner ends its sessions, an idle one and one mid-call, each with a
    process it started in the background; the stop is clean and nothing is left."""
    config = local.runner_config(PORT, "stockade-l-", pool_size=1, lean_pool_size=0,
                                 sessions=SessionPolicy(pool_size=2))
    with own_runner(config) as process:
        ids = [process.post("/v1/sessions", {}).json()["id"] for _ in range(2)]
        for session in ids:
            started = process.post(f"/v1/sessions/{session}/runs", {
                "code": "import subprocess\nbackground = subprocess.Popen(['sleep', '300'])"})
            assert started.json()["status"] == "ok"
        with ThreadPoolExecutor(max_workers=1) as pool:
            busy = pool.submit(process.post, f"/v1/sessions/{ids[1]}/runs",
                               {"code": "import time\ntime.sleep(30)"})
            time.sleep(0.5)
            started_stop = time.monotonic()
            assert process.stop(signal.SIGTERM) == 0, process.log()
            assert time.monotonic() - started_stop < 20
            answer = busy.result()
        assert answer.status == 200 and answer.json()["session_ended"] is True
        assert '"reason":"draining"' in process.log()
