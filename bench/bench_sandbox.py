"""Sandbox benchmark: confined runs vs bare interpreter spawns, interleaved in one process.

Not a test: it prints a table of medians, p99s and ratios against the baselines measured
in the same run (the machine is shared and noisy), and whether each target is met.
Needs root. Usage: .venv/bin/python bench/bench_sandbox.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import baseline
import load

from stockade.launcher import ZygoteProcess
from stockade.limits import Limits
from stockade.runner.front import zygote_client as client
from stockade.sandbox.config import SandboxConfig

HELLO = client.Job("print(1)")
PANDAS = client.Job("import pandas as pd\nprint(len(pd.DataFrame({'a': [1, 2]})))")
SMAPS = client.Job("print(open('/proc/self/smaps_rollup').read())")
LIMITS = Limits(memory_mib=512, processes=16)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ms(values: list[float], q: float) -> float:
    return load.percentile(values, q) * 1e3


def confined(sock: object, job: client.Job) -> Callable[[], None]:
    def go() -> None:
        result = client.run(sock, job, LIMITS)  # type: ignore[arg-type]
        if result.status != "ok":
            raise SystemExit(f"benchmark run failed: {result.status} {result.message}")
    return go


def throughput(workers: list[Callable[[], None]], seconds: float) -> float:
    counts = [0] * len(workers)
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            workers[i]()
            counts[i] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def private_kib(smaps: str) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in smaps.splitlines() if ":" in line)
    dirty = int(fields["Private_Dirty"].split()[0])
    return dirty, dirty + int(fields["Private_Clean"].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--pandas-spawns", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default="bench/results/sandbox.md")
    baseline.add_smoke(parser)
    args = parser.parse_args()
    args.rounds = baseline.rounds(args, args.rounds)
    args.pandas_spawns = baseline.rounds(args, args.pandas_spawns, 2)
    args.seconds = baseline.phase_s(args, args.seconds)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (it starts zygotes)")
    with ExitStack() as stack:
        socks = []
        for name, preload in (("bench-a", []), ("bench-b", []), ("bench-pd", ["numpy", "pandas"])):
            state = stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-"))
            config = SandboxConfig(socket_path=f"{state}/s", state_dir=state, name=name,
                                   run_uid=61900 + len(socks), run_gid=61900 + len(socks),
                                   preload=["json", *preload])
            zygote = stack.enter_context(ZygoteProcess(config))
            socks.append(stack.enter_context(zygote.connect()))
        hello_a, hello_b = confined(socks[0], HELLO), confined(socks[1], HELLO)
        pandas_run = confined(socks[2], PANDAS)
        # The baselines, each spawned by a process of its own (baseline.py).
        bare = stack.enter_context(baseline.Spawner())
        bare_pandas = stack.enter_context(baseline.Spawner((sys.executable, "-c",
                                                            "import pandas")))
        for fn in (hello_a, hello_b, pandas_run, bare, bare_pandas):
            fn()  # warm up
        t: dict[str, list[float]] = {"hello": [], "bare": [], "pandas": [], "bare_pandas": []}
        every = max(1, args.rounds // args.pandas_spawns)
        for i in range(args.rounds):
            t["hello"].append(timed(hello_a))
            t["bare"].append(bare())
            t["pandas"].append(timed(pandas_run))
            if i % every == 0:
                t["bare_pandas"].append(bare_pandas())
        tp = {
            "confined x1": throughput([hello_a], args.seconds),
            "bare x1": baseline.rate(1, args.seconds).per_s,
            "confined x2": throughput([hello_a, hello_b], args.seconds),
            "bare x2": baseline.rate(2, args.seconds).per_s,
        }
        mem = [private_kib(client.run(socks[0], SMAPS, LIMITS).stdout) for _ in range(20)]
        mem_pd = [private_kib(client.run(socks[2], SMAPS, LIMITS).stdout) for _ in range(20)]
    med = {k: statistics.median(v) for k, v in t.items()}
    dirty = statistics.median(m[0] for m in mem)
    dirty_pd = statistics.median(m[0] for m in mem_pd)
    targets = [
        ("confined hello median / bare spawn median", med["hello"] / med["bare"], "<=", 0.5),
        ("confined pandas run / fresh pandas import", med["pandas"] / med["bare_pandas"],
         "<=", 0.05),
        ("confined runs/s / bare spawns/s (2 concurrent)", tp["confined x2"] / tp["bare x2"],
         ">=", 2.0),
        ("private dirty KiB per child (hello)", dirty, "<=", 4096),
    ]
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform()}; {args.rounds} interleaved rounds.",
        "",
        "| measurement | median ms | p99 ms |", "|---|---|---|",
        *(f"| {name} | {ms(t[key], 0.5):.2f} | {ms(t[key], 0.99):.2f} |" for name, key in (
            ("confined `print(1)`", "hello"), ("bare `python3 -S -c pass`", "bare"),
            ("confined pandas run (preloaded)", "pandas"),
            ("bare `python3 -c 'import pandas'`", "bare_pandas"))),
        "", "| throughput | runs/s |", "|---|---|",
        *(f"| {name} | {value:.0f} |" for name, value in tp.items()),
        "", f"Private memory per child: hello {dirty:.0f} KiB dirty "
        f"({statistics.median(m[1] for m in mem):.0f} KiB private); with pandas preloaded "
        f"{dirty_pd:.0f} KiB dirty.", "",
        "| target | measured | goal | met |", "|---|---|---|---|",
        *(f"| {name} | {value:.3f} | {op} {goal} | "
          f"{'yes' if (value <= goal if op == '<=' else value >= goal) else 'NO'} |"
          for name, value, op, goal in targets),
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")
    load.rows_printed(len(lines))
    return 0


def platform() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, kernel {os.uname().release}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
