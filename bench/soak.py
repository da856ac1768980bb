"""Soak (not a test, not in CI): mixed good and hostile load through nginx for a while, then
check that containers, cgroups, the runner's open fds and its memory are back where they
started. `make soak` runs 10 minutes; `SOAK_S=60 make soak` a short one."""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path

from stockade.runner.local import NginxProcess, RunnerProcess, runner_config, serving

CLIENTS = 6
WARMUP_S = 15.0
RSS_SLACK_MIB = 8.0  # allocator noise; a leak grows without bound over 10 minutes
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

    return {"containers": len(runner.containers()), "cgroups": cgroups,
            "manager_fds": len(list(Path(f"/proc/{manager}/fd").iterdir())),
            "front_fds": len(list(Path(f"/proc/{front}/fd").iterdir())),
            "manager_rss_mib": rss(manager), "front_rss_mib": rss(front)}


def settle(runner: RunnerProcess) -> None:
    runner.wait_for_full_pool(runner.config.containers)
    time.sleep(2)  # let the manager reap and the allocator settle


def load(proxy: NginxProcess, seconds: float) -> tuple[Counter[str], list[str]]:
    outcomes: Counter[str] = Counter()
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    config = runner_config(18280, "stockade-s-", pool_size=2, queue_limit=32)
    with serving(config, 18281) as (runner, proxy):
        # Warm up first: the front keeps a connection per zygote and nginx keeps idle
        # upstream connections, so the steady state has a few more fds than a cold start.
        load(proxy, WARMUP_S)
        settle(runner)
        before = footprint(runner)
        outcomes, wrong = load(proxy, args.seconds)
        settle(runner)
        after = footprint(runner)
    print(json.dumps({"outcomes": outcomes, "before": before, "after": after}, indent=2))
    problems = list(wrong[:10])
    for key in ("containers", "cgroups", "manager_fds", "front_fds"):
        if after[key] != before[key]:
            problems.append(f"{key}: {before[key]} -> {after[key]}")
    for key in ("manager_rss_mib", "front_rss_mib"):
        if after[key] > before[key] + RSS_SLACK_MIB:
            problems.append(f"{key}: {before[key]:.1f} -> {after[key]:.1f} MiB")
    for problem in problems:
        print(f"SOAK PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
