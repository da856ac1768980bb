"""The one baseline every bench divides by: bare `python3 -S -c pass` spawns.

Each is a posix_spawn of /usr/bin/python3 with its stdout on a pipe read to EOF, then
reaped; they are made from N threads of a process of their own (this file, run as a
script), never from the bench's process, whose own work and GIL would slow them. A bench
asks for the rate at each concurrency it reports (`rate`), or for single spawns between
its own samples (`Spawner`), so that both sides of a ratio see the same machine.

Also each bench's `--smoke` switch: measuring phases of at most 2 s, for `make bench-smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import load

BARE = ("/usr/bin/python3", "-S", "-c", "pass")
SMOKE_S = 2.0  # the longest a measuring phase may last under --smoke


def spawn_once(argv: tuple[str, ...] = BARE) -> float:
    """One spawn, its stdout read to EOF and the process reaped; seconds it took."""
    started = time.perf_counter()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawn(argv[0], list(argv), {}, file_actions=[
            (os.POSIX_SPAWN_DUP2, out_w, 1)])
    finally:
        os.close(out_w)
    try:
        while os.read(out_r, 65536):
            pass
    finally:
        os.close(out_r)
    os.waitpid(pid, 0)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Rate:
    """Bare spawns at one concurrency: completed per second, and their latency."""

    concurrency: int
    per_s: float
    p50_ms: float
    p95_ms: float

    def __str__(self) -> str:
        return (f"{self.per_s:.0f}/s at c={self.concurrency} "
                f"(p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms)")


def _measure(concurrency: int, seconds: float, argv: tuple[str, ...]) -> dict[str, float]:
    times: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        while time.monotonic() < stop:
            times[index].append(spawn_once(argv))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    every = [t for per_thread in times for t in per_thread]
    return {"per_s": len(every) / took, "p50_ms": load.median_ms(every),
            "p95_ms": load.percentile(every, 0.95) * 1000}


def rate(concurrency: int, seconds: float, argv: tuple[str, ...] = BARE) -> Rate:
    """Bare spawns from `concurrency` threads of a process of their own, for `seconds`."""
    done = subprocess.run([sys.executable, __file__, "rate", str(concurrency), str(seconds),
                           *argv], capture_output=True, text=True, check=True,
                          timeout=seconds + 60)
    return Rate(concurrency, **json.loads(done.stdout))


class Spawner:
    """Single spawns on demand, made by a process of their own: for benches that
    interleave a bare spawn with each of their samples. Use it as a context manager."""

    def __init__(self, argv: tuple[str, ...] = BARE) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self) -> float:
        """One spawn's seconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def add_smoke(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help=f"measuring phases of at most {SMOKE_S:.0f} s (make bench-smoke)")


def phase_s(args: argparse.Namespace, seconds: float) -> float:
    """A measuring phase's length: `seconds`, or at most SMOKE_S under --smoke."""
    return min(seconds, SMOKE_S) if args.smoke else seconds


def rounds(args: argparse.Namespace, count: int, smoke_count: int = 20) -> int:
    """A sampling loop's count: `count`, or a few under --smoke."""
    return min(count, smoke_count) if args.smoke else count


def _main(argv: list[str]) -> int:
    what, *rest = argv
    if what == "rate":
        concurrency, seconds, *spawned = rest
        print(json.dumps(_measure(int(concurrency), float(seconds), tuple(spawned))))
        return 0
    if what == "serve":
        for _ in sys.stdin:
            print(spawn_once(tuple(rest)), flush=True)
        return 0
    raise SystemExit(f"usage: {Path(__file__).name} rate N SECONDS ARGV... | serve ARGV...")


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
