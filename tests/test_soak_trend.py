"""The soak's judge (bench/trend.py) on a real process: one that leaks a descriptor every
few runs is growing; one that opens a descriptor once, part-way, or closes some, is not."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import trend  # bench/ is not a package: put on the path above

# A "run" is a line on stdin; the program answers each after doing what `leak` says.
SERVER = """
import os, sys
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
for n, _ in enumerate(sys.stdin, 1):
    {leak}
    print(n, flush=True)
"""
RUNS, SAMPLE_EVERY = 1200, 100
STEP_AT = 500


def fd_samples(leak: str) -> tuple[list[float], list[float]]:
    """Runs so far and the process's open descriptors, every SAMPLE_EVERY runs."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(leak=leak)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    runs, fds = [], []
    try:
        for n in range(1, RUNS + 1):
            proc.stdin.write("run\n")
            proc.stdin.flush()
            assert int(proc.stdout.readline()) == n
            if n % SAMPLE_EVERY == 0:
                runs.append(float(n))
                fds.append(float(len(list(Path(f"/proc/{proc.pid}/fd").iterdir()))))
    finally:
        proc.kill()
        proc.wait()
    return runs, fds


CASES: dict[str, tuple[str, bool]] = {
    "a descriptor leaked every 50 runs": (
        "n % 50 == 0 and held.append(os.open('/dev/null', os.O_RDONLY))", True),
    "one descriptor opened once, part-way": (
        f"n == {STEP_AT} and held.append(os.open('/dev/null', os.O_RDONLY))", False),
    "descriptors closed part-way": (f"n == {STEP_AT} and [os.close(held.pop()) for _ in "
                                    "range(10)]", False),
    "nothing at all": ("pass", False),
}


@pytest.mark.parametrize("case", CASES)
def test_only_growth_with_the_runs_is_a_trend(case: str) -> None:
    leak, grows = CASES[case]
    runs, fds = fd_samples(leak)
    assert len(runs) >= trend.MIN_SAMPLES
    assert trend.growing(runs, fds, threshold=1.0) is grows, trend.describe(case, runs, fds)


@pytest.mark.parametrize(("values", "grows"), [
    (lambda i: 10 + (i >= 6), False),  # one step in the middle
    (lambda i: 10 + 2 * i, True),  # steady growth
    (lambda i: 20 - i, False),  # a decrease
])
def test_shapes(values: Callable[[int], float], grows: bool) -> None:
    runs = [float(500 * i) for i in range(12)]
    assert trend.growing(runs, [values(i) for i in range(12)], threshold=1.0) is grows


def test_too_few_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 10 samples"):
        trend.growing([1.0, 2.0], [1.0, 2.0], threshold=1.0)
