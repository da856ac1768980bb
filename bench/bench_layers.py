"""What each part of a confined run costs in throughput (not a test).

Two processes, each a preloaded interpreter like a zygote, fork runs of `print(1)` in a
loop, with the run's parts added one at a time. The last row is the zygote itself, in
process: a run prepared ahead by its `Family` (init, pid-only /proc, `worker_steps`, the
run's cgroup), started with its limits, supervised and reaped exactly as the zygote does,
less only the socket to the front. It is the all-layer ceiling `bench_http` is judged
against. Each row is divided by bare spawns at the same concurrency, measured beside it
(`baseline.py`). Every process, cgroup, mount and directory a row makes is gone when it
ends, on error too. Needs root.

Usage: .venv/bin/python bench/bench_layers.py [--seconds S] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import baseline
import load
import smoke

from stockade import protocol
from stockade.limits import LimitsIn
from stockade.runner.front import zygote_client as client
from stockade.sandbox import confine, libc
from stockade.sandbox.cgroups import CgroupDriver, RunCgroup
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.family import INIT_PROGRAM
from stockade.sandbox.plan import RunPlan, make_plan
from stockade.sandbox.worker import worker_steps
from stockade.sandbox.zygote import Zygote

LAYERS = ("fork", "pid namespace", "private root", "init process", "confinement steps",
          "run cgroup")  # "init process": catatonit as pid 1, the run as pid 2
ZYGOTE_ROW = "the zygote's own run (every layer)"
CGROUP_PARENT = "stockade-bench-layers"
CONCURRENCY = 2
UID_BASE = 61950
PR_SET_CHILD_SUBREAPER = 36  # orphans of this process's runs come back to it


def sandbox_config(index: int, state: str) -> SandboxConfig:
    uid = UID_BASE + index
    return SandboxConfig(socket_path=f"{state}/unused.sock", state_dir=state,
                         name=f"bench-layers-{index}", run_uid=uid, run_gid=uid,
                         cgroup_parent=CGROUP_PARENT, isolate_network=False)


def one_run(plan: RunPlan, layers: set[str], cgroup: RunCgroup | None) -> None:
    """The child: the chosen parts of a run's setup, then `print(1)` into a pipe."""
    out_r, out_w = os.pipe()
    procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_paths] if cgroup else []
    init = pid = None
    try:
        if "init process" in layers:  # pid 1, the run pid 2: as the zygote does
            init = os.posix_spawn(INIT_PROGRAM[0], list(INIT_PROGRAM), {})
        pid = os.fork()
        if pid == 0:
            _child(plan, layers, procs, out_w)
        os.close(out_w)
        printed = b""
        while chunk := os.read(out_r, 16):
            printed += chunk
        if printed != b"1\n":
            raise RuntimeError(f"a benchmark run printed {printed!r}, not 1")
    finally:
        for fd in (out_r, *procs):
            os.close(fd)
        for child in (pid, init):
            if child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)


def _child(plan: RunPlan, layers: set[str], procs: list[int], out_w: int) -> None:
    try:
        for fd in procs:
            os.write(fd, b"0")
        if "private root" in layers:
            confine.join_root_template(plan.root_template_fd)
        confine.enter_namespaces(libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS)
        if "private root" in layers:
            confine.enter_private_root(plan.root)  # its /proc shows pids only
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


def layered_runs(index: int, layers: set[str], state: str) -> Callable[[int], None]:
    """A run with `layers`, as a zygote-like process would fork it."""
    plan = make_plan(sandbox_config(index, state))
    cgroups = CgroupDriver(CGROUP_PARENT)
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def run(done: int) -> None:
        cgroup = cgroups.create(f"b{index}-{done}") if "run cgroup" in layers else None
        try:
            if "pid namespace" in layers:
                confine.enter_new_pid_namespace_for_children(own_pid_ns)
            one_run(plan, layers, cgroup)
        finally:
            if cgroup is not None:
                cgroup.remove()
    return run


def zygote_runs(index: int, state: str) -> tuple[Callable[[int], None], Zygote]:
    """A run as the zygote makes it: `Zygote._run` then `_release_finished`, with the
    descriptors the front's client would send (payload, stdin, stdout, stderr, outbox)."""
    config = sandbox_config(index, state)
    zygote = Zygote(config)
    zygote.preload()
    limits = config.limits.resolve(LimitsIn())
    payload = protocol.encode_payload(protocol.Payload("print(1)", [], []))
    # The front's end of the connection; the other end stays open, as a front's does
    # (a hung-up client cancels its run).
    front, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def run(_done: int) -> None:
        assert peer.fileno() >= 0
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        sent = [client.sealed_memfd("payload", payload), client.sealed_memfd("stdin", b""),
                out_w, err_w, os.memfd_create("outbox", os.MFD_CLOEXEC)]
        try:
            outcome = zygote._run(front, limits, sent)
        finally:
            for fd in sent:
                os.close(fd)
        printed = os.read(out_r, 64)
        for fd in (out_r, err_r):
            os.close(fd)
        zygote._release_finished()
        if printed != b"1\n" or outcome.exit_code != 0:
            raise RuntimeError(f"a zygote run printed {printed!r}: {outcome}")
    return run, zygote


def worker(index: int, row: str, seconds: float, report: int) -> None:
    """One of the zygote-like processes; writes its count of runs to `report`."""
    state = tempfile.mkdtemp(prefix="stockade-bench-layers-")
    zygote = None
    try:
        confine.last_capability(), confine.environ_block()  # as the zygote caches them
        if row == ZYGOTE_ROW:
            run, zygote = zygote_runs(index, state)
        else:
            run = layered_runs(index, set(LAYERS[:LAYERS.index(row) + 1]), state)
        gc.collect()
        gc.freeze()
        done, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            run(done)
            done += 1
        os.write(report, f"{done}\n".encode())
    except BaseException:
        traceback.print_exc()
    finally:
        if zygote is not None:
            zygote.close()
        with contextlib.suppress(OSError):
            (Path(state) / "root").rmdir()
        shutil.rmtree(state, ignore_errors=True)
        os._exit(0)


def rate_of_runs(row: str, seconds: float, concurrency: int = CONCURRENCY) -> float:
    """Runs per second made of `row` by `concurrency` zygote-like processes."""
    report_r, report_w = os.pipe()
    pids = []
    try:
        for index in range(concurrency):
            pid = os.fork()
            if pid == 0:
                os.close(report_r)
                worker(index, row, seconds, report_w)
            pids.append(pid)
        os.close(report_w)
        with os.fdopen(report_r) as counts:
            lines = counts.read().split()
    finally:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if len(lines) != concurrency:
        raise SystemExit(f"bench_layers: a worker of row {row!r} failed (its traceback "
                         "is above)")
    return sum(int(line) for line in lines) / seconds


def end_descendants() -> None:
    """Kill and reap whatever this process's runs left (an init whose worker died): it is
    the subreaper of everything it started."""
    while True:
        mine = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                if parent_pid(int(p.name)) == os.getpid()]
        if not mine:
            return
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in mine:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def parent_pid(pid: int) -> int:
    """A process's parent, from /proc (0 if it is gone)."""
    try:
        return int(smoke.stat_fields(Path(f"/proc/{pid}"))[1])
    except (OSError, IndexError, ValueError):
        return 0


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Root, this process the reaper of what its runs leave, the rows' cgroup parent made;
    afterwards, on every path, nothing of it left."""
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (namespaces, mounts, cgroups)")
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    driver = CgroupDriver(CGROUP_PARENT)
    driver.prepare()
    try:
        yield
    finally:
        end_descendants()
        driver.sweep("", timeout_s=2.0)
        for root in set(driver.roots.values()):
            with contextlib.suppress(OSError):
                root.rmdir()


def ceiling(seconds: float, concurrency: int = CONCURRENCY) -> float:
    """The all-layer row alone, measured by a process of its own (it reaps every process
    it finds its child): what other benches divide their throughput by."""
    done = subprocess.run([sys.executable, __file__, "--ceiling", "--seconds", str(seconds),
                           "--concurrency", str(concurrency)], capture_output=True, text=True,
                          timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_layers --ceiling failed: {done.stderr[-2000:]}")
    return float(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ceiling", action="store_true",
                        help="measure the all-layer row alone and print its runs/s")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    baseline.add_smoke(parser)
    args = parser.parse_args()
    seconds = baseline.phase_s(args, args.seconds)
    if args.ceiling:
        with measuring():
            print(rate_of_runs(ZYGOTE_ROW, seconds, args.concurrency))
        return 0
    rows: list[tuple[str, float, baseline.Rate]] = []
    with measuring():
        for row in (*LAYERS, ZYGOTE_ROW):
            bare = baseline.rate(CONCURRENCY, seconds)  # beside each row: the machine drifts
            rows.append((row, rate_of_runs(row, seconds), bare))
            print(f"measured: {row}", file=sys.stderr, flush=True)
    print(f"Machine: {os.cpu_count()} cores; {CONCURRENCY} concurrent, {seconds:g} s per row; "
          f"bare: posix_spawn of {' '.join(baseline.BARE)} from {CONCURRENCY} threads of a "
          "process of its own, beside each row.\n")
    print("| a run made of | runs/s | bare spawns/s | / bare |\n|---|---|---|---|")
    for index, (row, runs, bare) in enumerate(rows):
        name = row if row == ZYGOTE_ROW else " + ".join(LAYERS[:index + 1])
        print(f"| {name} | {runs:.0f} | {bare.per_s:.0f} | {runs / bare.per_s:.2f} |")
    load.rows_printed(len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
