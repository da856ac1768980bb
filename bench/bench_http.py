"""End-to-end benchmark of the runner (not a test), every side measured in one run:
- a confined hello-world's latency over HTTP, direct and through nginx, each sample beside
  a bare `python3 -S -c pass` spawn (`baseline.Spawner`);
- hello-worlds per second from 1, 2 and 8 client processes, direct and through nginx, with
  the clients' own CPU, against bare spawns at the same concurrency (`baseline.rate`) and
  against the all-layer ceiling (`bench_layers`' last row: the zygote's own run, no HTTP);
- how long a retired container takes to be replaced, and the runner's idle memory.

Targets (2-core machine; printed, never asserted): hello p50 <= 0.45x a bare spawn's;
runs/s at 2 and 8 clients >= 0.8x the ceiling (>= 0.75x through nginx); a retired
container replaced within 1 s; the manager and the front each <= 60 MiB idle.

Usage: .venv/bin/python bench/bench_http.py [--rounds N] [--seconds S] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import baseline
import bench_layers
import load

from stockade.runner.local import NginxProcess, RunnerProcess, runner_config, serving

CLIENTS = (1, 2, 8)


def latency(runner: RunnerProcess, proxy: NginxProcess, rounds: int) -> dict[str, float]:
    direct, via_nginx = load.Connection(runner.port), load.Connection(proxy.port)
    samples: dict[str, list[float]] = {"bare": [], "direct": [], "nginx": []}
    with baseline.Spawner() as bare:
        for _ in range(min(rounds, 20)):  # warm the connections, the pool and the page cache
            direct.hello(), via_nginx.hello(), bare()
        for _ in range(rounds):  # interleaved, so drift hits all three alike
            samples["bare"].append(bare())
            samples["direct"].append(direct.hello())
            samples["nginx"].append(via_nginx.hello())
    out = {}
    for name, values in samples.items():
        out[f"{name}_p50_ms"] = load.median_ms(values)
        out[f"{name}_p99_ms"] = load.percentile(values, 0.99) * 1000
    out["direct_p50_ratio"] = out["direct_p50_ms"] / out["bare_p50_ms"]
    out["nginx_p50_ratio"] = out["nginx_p50_ms"] / out["bare_p50_ms"]
    return out


def throughput(runner: RunnerProcess, proxy: NginxProcess, seconds: float) -> dict[str, float]:
    out = {"ceiling_per_s": bench_layers.ceiling(seconds)}
    for clients in CLIENTS:
        out[f"bare_{clients}_per_s"] = baseline.rate(clients, seconds).per_s
        for via, port in (("direct", runner.port), ("nginx", proxy.port)):
            measured = load.hello_rate(port, clients, seconds)
            out[f"{via}_{clients}_per_s"] = measured.per_s
            out[f"{via}_{clients}_client_cpu"] = measured.client_cpu
            out[f"{via}_{clients}_bare_ratio"] = measured.per_s / out[f"bare_{clients}_per_s"]
            out[f"{via}_{clients}_ceiling_ratio"] = measured.per_s / out["ceiling_per_s"]
    return out


def recycle(runner: RunnerProcess, times: int) -> dict[str, float]:
    """Time from a retired container's last run to its replacement serving (measured by
    the pool): a run ended by a signal the zygote did not send retires its container."""
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


TARGETS = [("direct_p50_ratio", "<=", 0.45), ("nginx_p50_ratio", "<=", 0.45),
           *((f"direct_{c}_ceiling_ratio", ">=", 0.8) for c in (2, 8)),
           *((f"nginx_{c}_ceiling_ratio", ">=", 0.75) for c in (2, 8)),
           ("recycle_max_s", "<=", 1.0), ("manager_rss_mib", "<=", 60),
           ("front_rss_mib", "<=", 60)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    baseline.add_smoke(parser)
    args = parser.parse_args()
    seconds = baseline.phase_s(args, args.seconds)
    config = runner_config(18180, "stockade-bench-http-", pool_size=2, queue_limit=64)
    with serving(config, 18181) as (runner, proxy):
        results = {**idle_memory(runner),
                   **latency(runner, proxy, baseline.rounds(args, args.rounds)),
                   **throughput(runner, proxy, seconds),
                   **recycle(runner, 1 if args.smoke else 5)}
    load.write_results("http", results)
    for name, value in results.items():
        print(f"{name:28} {value:10.3f}")
    load.print_targets(results, TARGETS)
    load.rows_printed(len(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
