"""End-to-end benchmark of the runner (not a test): a confined hello-world over HTTP, direct
and through nginx, against bare `python3 -S -c pass` spawns interleaved in the same run;
throughput at 1, 2 and 8 clients; how long a dirty container takes to be replaced; the
runner's idle memory. Ratios, because this machine is shared and noisy.

Targets (2-core machine): HTTP median <= 0.6x a bare spawn; throughput >= 1.5x bare
spawns/s; a dirty container replaced within 1 s; runner RSS <= 60 MiB idle.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

from stockade.runner.local import NginxProcess, RunnerProcess, runner_config, serving

BARE = ["/usr/bin/python3", "-S", "-c", "pass"]
HELLO = json.dumps({"code": "print('hello')"}).encode()
RESULTS = Path(__file__).parent / "results"


class Connection:
    """One keep-alive HTTP connection, as a real client library would hold."""

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


def bare_spawn() -> float:
    started = time.perf_counter()
    subprocess.run(BARE, check=True)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(runner: RunnerProcess, proxy: NginxProcess, rounds: int) -> dict[str, float]:
    direct, via_nginx = Connection(runner.port), Connection(proxy.port)
    for _ in range(20):  # warm the connections, the pool and the page cache
        direct.hello()
        via_nginx.hello()
        bare_spawn()
    samples: dict[str, list[float]] = {"bare": [], "direct": [], "nginx": []}
    for _ in range(rounds):  # interleaved, so drift hits all three alike
        samples["bare"].append(bare_spawn())
        samples["direct"].append(direct.hello())
        samples["nginx"].append(via_nginx.hello())
    out = {}
    for name, values in samples.items():
        out[f"{name}_median_ms"] = statistics.median(values) * 1000
        out[f"{name}_p99_ms"] = percentile(values, 0.99) * 1000
    out["direct_ratio"] = out["direct_median_ms"] / out["bare_median_ms"]
    out["nginx_ratio"] = out["nginx_median_ms"] / out["bare_median_ms"]
    return out


def rate(work: object, clients: int, seconds: float) -> float:
    """Calls per second of `work` (a factory of a zero-argument callable) from N threads."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        call = work()  # type: ignore[operator]
        while time.monotonic() < stop:
            call()
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def throughput(runner: RunnerProcess, seconds: float) -> dict[str, float]:
    out = {"bare_per_s": rate(lambda: bare_spawn, 2, seconds)}
    for clients in (1, 2, 8):
        out[f"http_{clients}_per_s"] = rate(lambda: Connection(runner.port).hello, clients,
                                            seconds)
        out[f"http_{clients}_ratio"] = out[f"http_{clients}_per_s"] / out["bare_per_s"]
    return out


def recycle(runner: RunnerProcess, times: int) -> dict[str, float]:
    """Time from a retired container's last run to its replacement serving (measured by
    the pool). A signal the zygote did not send retires a container; a failure does not."""
    samples = []
    for _ in range(times):
        runner.wait_for_full_pool(runner.config.containers)
        before = runner.metric("stockade_pool_recycled_total")
        runner.run("import os\nos.abort()")
        while runner.metric("stockade_pool_recycled_total") == before:
            time.sleep(0.02)
        runner.wait_for_full_pool(runner.config.containers)
        samples.append(runner.metric("stockade_pool_last_recycle_seconds"))
    return {"recycle_median_s": statistics.median(samples), "recycle_max_s": max(samples)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def idle_memory(runner: RunnerProcess) -> dict[str, float]:
    assert runner.proc is not None
    manager = runner.proc.pid
    front = int(Path(f"/proc/{manager}/task/{manager}/children").read_text().split()[0])
    time.sleep(1.0)
    return {"manager_rss_mib": rss_mib(manager), "front_rss_mib": rss_mib(front)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    config = runner_config(18180, "stockade-b-", pool_size=2, queue_limit=64)
    with serving(config, 18181) as (runner, proxy):
        results = {**idle_memory(runner), **latency(runner, proxy, args.rounds),
                   **throughput(runner, args.seconds), **recycle(runner, 5)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http.json").write_text(json.dumps(results, indent=2))
    for name, value in results.items():
        print(f"{name:24} {value:10.3f}")
    targets = [("direct_ratio", "<=", 0.6), ("nginx_ratio", "<=", 0.6),
               ("http_2_ratio", ">=", 1.5), ("recycle_max_s", "<=", 1.0),
               ("manager_rss_mib", "<=", 60), ("front_rss_mib", "<=", 60)]
    for name, op, bound in targets:
        met = results[name] <= bound if op == "<=" else results[name] >= bound
        print(f"target {name} {op} {bound}: {'met' if met else 'NOT met'} "
              f"({results[name]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
