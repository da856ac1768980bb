"""HTTP load for the benches: a keep-alive connection as a client library holds one, and
clients as processes of their own, so that the bench's process is never the bottleneck
and the clients' own CPU is reported beside what they measured."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import multiprocessing.connection
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

HELLO = json.dumps({"code": "print('hello')"}).encode()
RESULTS = Path(__file__).parent / "results"


class Connection:
    """One keep-alive HTTP connection to a runner (or nginx) on loopback."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def post(self, body: bytes, status: str = "ok", stdout: str | None = None) -> float:
        """Seconds for one run; its answer must have this status (and stdout)."""
        started = time.perf_counter()
        self.conn.request("POST", "/v1/runs", body=body, headers=self.headers)
        answer = self.conn.getresponse()
        raw = answer.read()
        elapsed = time.perf_counter() - started
        record = json.loads(raw) if answer.status == 200 else {}
        if record.get("status") != status or stdout not in (None, record.get("stdout")):
            raise RuntimeError(f"bad answer {answer.status}: {raw[:300]!r}")
        return elapsed

    def hello(self) -> float:
        return self.post(HELLO, stdout="hello\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


@dataclass(frozen=True)
class Throughput:
    """Hello-worlds from `clients` client processes: completed per second, and the CPU
    the clients themselves used (of one core: 1.0 is a core kept busy)."""

    clients: int
    per_s: float
    client_cpu: float


def _client(port: int, key: str | None, seconds: float, start: float,
            report: multiprocessing.connection.Connection) -> None:
    connection = Connection(port, key)
    connection.hello()  # the connection made before the clock starts
    while time.monotonic() < start:
        time.sleep(0.001)
    done, stop, cpu = 0, start + seconds, time.process_time()
    while time.monotonic() < stop:
        connection.hello()
        done += 1
    report.send((done, time.process_time() - cpu))


def hello_rate(port: int, clients: int, seconds: float, key: str | None = None) -> Throughput:
    """Hello-worlds per second from `clients` processes, each on its own connection."""
    context = multiprocessing.get_context("fork")
    start = time.monotonic() + 0.5
    pipes, procs = [], []
    for _ in range(clients):
        ours, theirs = context.Pipe(duplex=False)
        proc = context.Process(target=_client, args=(port, key, seconds, start, theirs))
        proc.start()
        theirs.close()  # a client that dies is then an EOFError here, not a hang
        pipes.append(ours)
        procs.append(proc)
    try:
        counts = [pipe.recv() for pipe in pipes]
    except EOFError:
        raise RuntimeError("a client process failed (its traceback is above)") from None
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return Throughput(clients, sum(c for c, _ in counts) / seconds,
                      sum(cpu for _, cpu in counts) / seconds)


def write_results(name: str, results: dict[str, float]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))


def print_targets(results: dict[str, float], targets: list[tuple[str, str, float]]) -> None:
    """Each target, met or not: printed, never asserted (benches are not tests)."""
    for name, op, bound in targets:
        met = results[name] <= bound if op == "<=" else results[name] >= bound
        print(f"target {name} {op} {bound}: {'met' if met else 'NOT met'} "
              f"({results[name]:.3f})")


def rows_printed(count: int) -> None:
    """The last line of every bench: how many rows it printed (`make bench-smoke` checks
    that a bench got to the end)."""
    print(f"bench: {count} rows, pid {os.getpid()}")
