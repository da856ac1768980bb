"""Sessions (not a test): how long a session takes to start and a trivial cell to run over
HTTP, against bare `python3 -S -c pass` spawns interleaved in the same run; an idle
session's private memory; and a one-shot hello-world's latency while every session
container is busy, against the same with no session at all.

Targets (2-core machine; printed, never asserted): session start <= 0.2x a bare spawn; a
trivial cell <= 0.15x a bare spawn; an idle session's private memory <= 4.5 MiB beyond what
it allocated; runs no slower while every session holds its container.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import baseline
import load
from load import Connection

from stockade.runner.config import SessionPolicy
from stockade.runner.local import RunnerProcess, runner_config


class Sessions:
    """A keep-alive connection to the sessions' routes."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> tuple[float, int, Any]:
        started = time.perf_counter()
        self.conn.request(method, path, body=None if body is None else json.dumps(body),
                          headers={"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        raw = answer.read()
        elapsed = time.perf_counter() - started
        return elapsed, answer.status, json.loads(raw) if raw else None

    def start(self) -> tuple[float, str]:
        elapsed, status, info = self.call("POST", "/v1/sessions", {})
        if status != 201:
            raise RuntimeError(f"session start: {status} {info}")
        return elapsed, info["id"]

    def cell(self, session: str, code: str) -> float:
        elapsed, status, record = self.call("POST", f"/v1/sessions/{session}/runs",
                                            {"code": code})
        if status != 200 or record["status"] != "ok":
            raise RuntimeError(f"cell: {status} {record}")
        return elapsed

    def end(self, session: str) -> None:
        self.call("DELETE", f"/v1/sessions/{session}")


def latency(runner: RunnerProcess, rounds: int,
            bare_spawn: baseline.Spawner) -> dict[str, float]:
    """Trivial cells, then session starts, each interleaved with bare spawns (apart: a
    session's end sets its container up for the next in the background); and cells back
    to back."""
    client = Sessions(runner.port)
    _, kept = client.start()
    for _ in range(10):
        client.cell(kept, "1")
        bare_spawn()
    samples: dict[str, list[float]] = {"bare": [], "start": [], "cell": [], "get": []}
    for _ in range(rounds):  # interleaved, so drift hits all alike
        samples["bare"].append(bare_spawn())
        samples["cell"].append(client.cell(kept, "1"))
        samples["bare"].append(bare_spawn())
        # The floor: the same HTTP path to the same session, no call into it.
        samples["get"].append(client.call("GET", f"/v1/sessions/{kept}")[0])
    # As a notebook sends them: one after another (no spawn between to chill the caches).
    samples["cell_back_to_back"] = [client.cell(kept, "1") for _ in range(rounds)]
    client.end(kept)
    for _ in range(rounds):
        samples["bare"].append(bare_spawn())
        took, session = client.start()
        samples["start"].append(took)
        client.end(session)
    out = {f"{name}_median_ms": statistics.median(v) * 1000 for name, v in samples.items()}
    out["start_ratio"] = out["start_median_ms"] / out["bare_median_ms"]
    out["cell_ratio"] = out["cell_median_ms"] / out["bare_median_ms"]
    out["cell_back_to_back_ratio"] = out["cell_back_to_back_median_ms"] / out["bare_median_ms"]
    out["get_ratio"] = out["get_median_ms"] / out["bare_median_ms"]
    return out


def _process_holding(name: str) -> int:
    """The host pid of the process that holds a file named `name` open."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no process holds {name}")


def _private_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))
    return kib / 1024


def idle_memory(runner: RunnerProcess) -> dict[str, float]:
    """An idle session's private memory after a trivial cell, and after it allocated and
    touched 32 MiB (so what is beyond an allocation shows)."""
    client = Sessions(runner.port)
    _, session = client.start()
    marker = f"marker-{uuid.uuid4().hex}"
    client.cell(session, f"keep = open({marker!r}, 'w')\n1")
    time.sleep(0.5)
    pid = _process_holding(marker)
    idle = _private_mib(pid)
    client.cell(session, "block = bytearray(32 << 20)")
    allocated = _private_mib(pid) - 32
    client.end(session)
    return {"idle_session_private_mib": idle, "beyond_32_mib_allocated_mib": allocated}


def runs_beside_busy_sessions(runner: RunnerProcess, rounds: int) -> dict[str, float]:
    """Hello-world latency alone, then while every session container holds a call (a
    sleeping one: the point is the containers, not the two cores)."""
    hello = Connection(runner.port)
    for _ in range(20):
        hello.hello()
    quiet = statistics.median(hello.hello() for _ in range(rounds)) * 1000
    client = Sessions(runner.port)
    ids = [client.start()[1] for _ in range(runner.config.sessions.pool_size)]
    stop = time.monotonic() + 60  # a bound, should a call hang

    def busy(session: str) -> None:
        own = Sessions(runner.port)
        while time.monotonic() < stop:
            own.cell(session, "import time\ntime.sleep(0.5)")

    threads = [threading.Thread(target=busy, args=(s,), daemon=True) for s in ids]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    loaded = statistics.median(hello.hello() for _ in range(rounds)) * 1000
    stop = 0.0
    for thread in threads:
        thread.join()
    for session in ids:
        client.end(session)
    return {"hello_quiet_ms": quiet, "hello_beside_busy_sessions_ms": loaded,
            "beside_sessions_ratio": loaded / quiet}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    baseline.add_smoke(parser)
    args = parser.parse_args()
    rounds = baseline.rounds(args, args.rounds)
    config = runner_config(18192, "stockade-bench-ses-", sessions=SessionPolicy(pool_size=2))
    runner = RunnerProcess(config)
    try:
        runner.start()
        with baseline.Spawner() as bare_spawn:
            results = {**latency(runner, rounds, bare_spawn), **idle_memory(runner),
                       **runs_beside_busy_sessions(runner, rounds)}
    finally:
        if runner.proc is not None:
            runner.stop()
        runner.close()
    load.write_results("sessions", results)
    for name, value in results.items():
        print(f"{name:32} {value:10.3f}")
    load.print_targets(results, [("start_ratio", "<=", 0.2), ("cell_ratio", "<=", 0.15),
                                 ("beyond_32_mib_allocated_mib", "<=", 4.5)])
    load.rows_printed(len(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
