"""The benches end what they make: processes (a run's init included), containers, cgroups,
mounts, run and temporary directories; when they finish, and when they are interrupted
part-way (bench/smoke.py's `leftovers` is what `make bench-smoke` checks too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import smoke  # noqa: E402 - bench/ is not a package
from bench_layers import parent_pid  # noqa: E402


def test_bench_layers_leaves_nothing_when_it_ends() -> None:
    before = smoke.leftovers()
    done = subprocess.run([sys.executable, str(BENCH / "bench_layers.py"), "--seconds", "0.3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| the zygote's own run (every layer) |" in done.stdout
    assert smoke.left_since(before, settle_s=15.0) == []


def test_a_run_init_is_the_benchs_only_when_it_is_orphaned_or_below_the_bench() -> None:
    """A zygote of the tests or of a runner keeps an init ready for its next run, and may
    start one at any moment: that is no bench's leftover. One below a bench's process is."""
    def inits(found: set[str]) -> set[int]:
        return {int(line.split()[1]) for line in found
                if line.split(": ", 1)[1].startswith("/usr/bin/catatonit")}

    kept = subprocess.Popen(["/usr/bin/catatonit", "-P"])
    below = subprocess.Popen(["/bin/sh", "-c", "/usr/bin/catatonit -P & wait", "stockade-bench-t"])
    try:
        deadline = time.monotonic() + 10
        while len(inits(smoke.leftovers())) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = smoke.leftovers()
        assert kept.pid not in inits(found)
        assert [parent_pid(pid) for pid in inits(found)] == [below.pid], found
    finally:
        for pid in inits(smoke.leftovers()):
            os.kill(pid, signal.SIGKILL)
        for proc in (kept, below):
            proc.kill()
            proc.wait()


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text(errors="replace").strip()
    except OSError:  # gone meanwhile
        return ""


def _runs_with_inits(bench: int) -> bool:
    """A run's init (catatonit) below one of the bench's zygote-like processes."""
    return any(parent_pid(parent_pid(int(p.name))) == bench
               for p in Path("/proc").glob("[0-9]*") if _comm(p) == "catatonit")


@pytest.mark.parametrize(("bench", "argv", "started"), [
    # Interrupted while its zygote-like processes fork runs, each with an init.
    ("bench_layers", ["--seconds", "3"], _runs_with_inits),
    # Interrupted once its runner's containers are up.
    ("bench_neighbours", [], lambda _: any(Path("/var/lib/stockade/containers").glob(
        "stockade-bench-nb-*"))),
])
def test_an_interrupted_bench_leaves_nothing(bench: str, argv: list[str],
                                             started: Callable[[int], bool]) -> None:
    before = smoke.leftovers()
    # Ctrl-C's default, whatever this process was started with (a background job's shell
    # ignores SIGINT, and so would the bench, which would then run to its end).
    proc = subprocess.Popen([sys.executable, str(BENCH / f"{bench}.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)  # noqa: PLW1509 - one signal call
    try:
        deadline = time.monotonic() + 240
        while not started(proc.pid) and proc.poll() is None:
            assert time.monotonic() < deadline, f"{bench} never got going"
            time.sleep(0.2)
        assert proc.poll() is None, f"{bench} ended before it was interrupted"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, errors = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in errors, errors[-2000:]
    assert smoke.left_since(before, settle_s=15.0) == []
