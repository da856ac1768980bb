"""What each part of a confined run costs in throughput (not a test).

Two processes, each a preloaded interpreter like a zygote, fork runs of `print(1)` in a
loop for a few seconds, with the run's parts added one at a time; bare `python3 -S -c
pass` spawns from two threads are measured in the same run. Nothing here is the zygote's
protocol or supervision: the last row is roughly the most a zygote that forks one run at
a time could reach on this machine. Needs root.

Usage: .venv/bin/python bench/bench_layers.py [--seconds S]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

from stockade.sandbox import confine, libc
from stockade.sandbox.cgroups import CgroupDriver, RunCgroup
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.family import INIT_PROGRAM
from stockade.sandbox.plan import RunPlan, make_plan
from stockade.sandbox.worker import worker_steps

LAYERS = ("fork", "pid namespace", "private root", "init process", "confinement steps",
          "run cgroup")  # "init process": catatonit as pid 1, the run as pid 2
CGROUP_PARENT = "stockade-bench-layers"


def plan_for(index: int, state: str) -> RunPlan:
    uid = 61950 + index
    return make_plan(SandboxConfig(socket_path=f"{state}/unused.sock", state_dir=state,
                                          run_uid=uid, run_gid=uid, isolate_network=False))


def one_run(plan: RunPlan, layers: set[str], cgroup: RunCgroup | None) -> None:
    """The child: the chosen parts of a run's setup, then `print(1)` into a pipe."""
    out_r, out_w = os.pipe()
    procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_paths] if cgroup else []
    init = os.posix_spawn(INIT_PROGRAM[0], list(INIT_PROGRAM), {}) \
        if "init process" in layers else None  # pid 1, the run pid 2: as the zygote does
    pid = os.fork()
    if pid == 0:
        try:
            for fd in procs:
                os.write(fd, b"0")
            if "private root" in layers:
                confine.join_root_template(plan.root_template_fd)
            confine.enter_namespaces(libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS)
            if "private root" in layers:
                confine.enter_private_root(plan.root)
            if "confinement steps" in layers:
                for _, step in worker_steps(plan, {out_w}):
                    step()
            os.dup2(out_w, 1)
            exec(compile("print(1)", "main.py", "exec"), {})  # noqa: S102 - the benchmark
            sys.stdout.flush()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(out_w)
    for fd in procs:
        os.close(fd)
    printed = b""
    while chunk := os.read(out_r, 16):
        printed += chunk
    if printed != b"1\n":
        raise SystemExit(f"a benchmark run printed {printed!r}, not 1")
    os.close(out_r)
    os.waitpid(pid, 0)
    if init is not None:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)


def worker(index: int, layers: set[str], seconds: float, report: int) -> None:
    """One of the two zygote-like processes; writes its count of runs to `report`."""
    state = tempfile.mkdtemp(prefix="stockade-bench-layers-")
    try:
        plan = plan_for(index, state)
        cgroups = CgroupDriver(CGROUP_PARENT)
        own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        gc.collect()
        gc.freeze()
        done, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            cgroup = cgroups.create(f"b{index}-{done}") if "run cgroup" in layers else None
            if "pid namespace" in layers:
                confine.enter_new_pid_namespace_for_children(own_pid_ns)
            one_run(plan, layers, cgroup)
            if cgroup is not None:
                cgroup.remove()
            done += 1
        os.write(report, f"{done}\n".encode())
    except BaseException:
        traceback.print_exc()
    finally:
        shutil.rmtree(state, ignore_errors=True)
        os._exit(0)


def rate_of_runs(layers: set[str], seconds: float) -> float:
    report_r, report_w = os.pipe()
    pids = []
    for index in range(2):
        pid = os.fork()
        if pid == 0:
            worker(index, layers, seconds, report_w)
        pids.append(pid)
    os.close(report_w)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(report_r) as counts:
        return sum(int(line) for line in counts) / seconds


def rate_of_spawns(seconds: float) -> float:
    done = [0, 0]
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        while time.monotonic() < stop:
            os.waitpid(os.posix_spawn("/usr/bin/python3", ["python3", "-S", "-c", "pass"],
                                      {}), 0)
            done[index] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (namespaces, mounts, cgroups)")
    CgroupDriver(CGROUP_PARENT).prepare()
    rows: list[tuple[str, float, float]] = []
    try:
        for count in range(1, len(LAYERS) + 1):
            bare = rate_of_spawns(args.seconds)  # measured next to each row: the machine drifts
            runs = rate_of_runs(set(LAYERS[:count]), args.seconds)
            rows.append((" + ".join(LAYERS[:count]), runs, runs / bare))
    finally:
        CgroupDriver(CGROUP_PARENT).sweep("b", timeout_s=2.0)
        for root in set(CgroupDriver(CGROUP_PARENT).roots.values()):
            root.rmdir()
    print(f"Machine: {os.cpu_count()} cores; 2 concurrent, {args.seconds:.0f} s per row.\n")
    print("| a run made of | runs/s | / bare spawns/s |\n|---|---|---|")
    for name, runs, ratio in rows:
        print(f"| {name} | {runs:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
