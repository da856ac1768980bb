"""The benches end what they make: processes (a run's init included), containers, cgroups,
mounts, run and temporary directories; when they finish, and when they are interrupted
part-way (bench/smoke.py's `leftovers` is what `make bench-smoke` checks too)."""

from __future__ import annotations

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
    proc = subprocess.Popen([sys.executable, str(BENCH / f"{bench}.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
