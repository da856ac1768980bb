"""Soak (not a test, not in CI): mixed good and hostile load through nginx for a while,
sampling containers, cgroups, mounts, the manager's and the front's descriptors and memory
SAMPLES times; a measure that grows with the runs is a problem (trend.py), a one-time
step or a decrease is not. `make soak` runs 10 minutes; `SOAK_S=60 make soak` a short one."""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path

import trend

from stockade.runner.local import NginxProcess, RunnerProcess, runner_config, serving

CLIENTS = 6
WARMUP_S = 15.0
SAMPLES = 12  # taken during the load, after the warm-up (trend.py needs 10 at least)
# What a measure may grow per 1,000 runs before it is a leak (trend.py also needs the
# growth to show in the thirds' medians and not to be one step).
THRESHOLDS = {"containers": 0.5, "cgroups": 0.5, "mounts": 0.5, "manager_fds": 1.0,
              "front_fds": 1.0, "manager_rss_mib": 2.0, "front_rss_mib": 2.0}
MIX = [
    ("hello", {"code": "print('hi')"}, "ok"),
    ("pandas", {"code": "import pandas as pd\nprint(pd.Series([1, 2]).sum())"}, "ok"),
    ("stdin", {"code": "print(input()[::-1])", "stdin": "abc"}, "ok"),
    ("fork_bomb", {"code": "import os\nwhile True: os.fork()"}, "runtime_error"),
    ("oom", {"code": "b = bytearray(400 << 20)", "limits": {"memory_mib": 64}},
     "memory_limit"),
    ("cpu_spin", {"code": "while True: pass", "limits": {"cpu_time_s": 0.3}}, "time_limit"),
    ("sleeper", {"code": "import time\ntime.sleep(60)", "limits": {"wall_time_s": 0.5}},
     "wall_time_limit"),
    ("flood", {"code": "while True: print('x' * 999)", "limits": {"output_kib": 8}},
     "output_limit"),
    ("daemon", {"code": "import os\nif os.fork() == 0:\n    import time; time.sleep(600)"},
     "ok"),
]


def footprint(runner: RunnerProcess) -> dict[str, float]:
    assert runner.proc is not None
    manager = runner.proc.pid
    front = int(Path(f"/proc/{manager}/task/{manager}/children").read_text().split()[0])
    cgroups = sum(1 for h in Path("/sys/fs/cgroup").iterdir()
                  for _ in h.glob(f"**/lxc.*.{runner.config.container_prefix}*"))

    def rss(pid: int) -> float:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    mounts = sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if runner.config.container_prefix in line)
    return {"containers": len(runner.containers()), "cgroups": cgroups, "mounts": mounts,
            "manager_fds": len(list(Path(f"/proc/{manager}/fd").iterdir())),
            "front_fds": len(list(Path(f"/proc/{front}/fd").iterdir())),
            "manager_rss_mib": rss(manager), "front_rss_mib": rss(front)}


def settle(runner: RunnerProcess) -> None:
    runner.wait_for_full_pool(runner.config.containers)
    time.sleep(2)  # let the manager reap and the allocator settle


def load(proxy: NginxProcess, seconds: float,
         outcomes: Counter[str] | None = None) -> tuple[Counter[str], list[str]]:
    outcomes = Counter() if outcomes is None else outcomes
    wrong: list[str] = []
    stop = time.monotonic() + seconds
    cases = itertools.cycle(MIX)
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < stop:
            with lock:
                name, payload, expected = next(cases)
            answer = proxy.post("/v1/runs", payload, timeout=120)
            status = answer.json()["status"] if answer.status == 200 else str(answer.status)
            with lock:
                outcomes[f"{name}:{status}"] += 1
                if status not in (expected, "503"):
                    wrong.append(f"{name}: {status} {answer.body[:200]!r}")

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, wrong


def sampled_load(runner: RunnerProcess, proxy: NginxProcess,
                 seconds: float) -> tuple[Counter[str], list[str], list[float],
                                          list[dict[str, float]]]:
    """The load for `seconds`, with SAMPLES footprints taken evenly through it, each with
    the number of runs answered by then."""
    outcomes: Counter[str] = Counter()
    runs, samples = [], []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load, proxy, seconds, outcomes)
        started = time.monotonic()
        for index in range(1, SAMPLES + 1):
            time.sleep(max(0.0, started + index * seconds / (SAMPLES + 1) - time.monotonic()))
            samples.append(footprint(runner))
            runs.append(float(sum(outcomes.values())))
        _, wrong = loading.result()
    return outcomes, wrong, runs, samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    config = runner_config(18280, "stockade-bench-soak-", pool_size=2, queue_limit=32)
    with serving(config, 18281) as (runner, proxy):
        # Warm up first: the front keeps a connection per zygote and nginx keeps idle
        # upstream connections, so the steady state has a few more fds than a cold start.
        load(proxy, WARMUP_S)
        settle(runner)
        outcomes, wrong, runs, samples = sampled_load(runner, proxy, args.seconds)
        settle(runner)
    print(json.dumps({"outcomes": outcomes, "runs": runs, "samples": samples}, indent=2))
    problems = list(wrong[:10])
    for key, threshold in THRESHOLDS.items():
        values = [sample[key] for sample in samples]
        if trend.growing(runs, values, threshold):
            problems.append(f"grows with the runs: {trend.describe(key, runs, values)}")
    for problem in problems:
        print(f"SOAK PROBLEM: {problem}")
    print(f"soak: {sum(outcomes.values())} runs, {len(samples)} samples, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
