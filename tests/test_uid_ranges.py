"""Per-container uid ranges: no two containers of a pool share a host uid, so what the
kernel counts per uid (here: pipe buffer pages) one container's runs use up is never
taken from another's."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from stockade.result import Result
from stockade.runner.local import RunnerProcess, runner_config
from stockade.runner.manager.idmap import RangeError, Ranges
from support.runners import own_runner

PORT = 18093


def test_ranges_are_held_until_given_back() -> None:
    ranges = Ranges(100000, 65536, 3)
    assert [ranges.take(n) for n in ("a", "b", "c")] == [100000, 165536, 231072]
    assert ranges.take("b") == 165536  # the same container, the same range
    with pytest.raises(RangeError, match="all 3 uid ranges are held"):
        ranges.take("d")
    ranges.give_back("b")
    assert ranges.take("d") == 165536


def _root_uids(runner: RunnerProcess) -> dict[str, str]:
    """Each container's uid map, as its init's /proc shows it."""
    maps = {}
    for name in runner.containers():
        pid = subprocess.run(["lxc-info", "-n", name, "-P", runner.config.lxc_path, "-p",
                              "-H"], capture_output=True, text=True, check=True).stdout.strip()
        maps[name] = Path(f"/proc/{pid}/uid_map").read_text().split()
    return maps


HOG = """
import fcntl, os, time
pipes = []
for _ in range(100):  # 1 MiB of pipe buffer each, until the uid's soft quota (64 MiB) is spent
    r, w = os.pipe()
    pipes.append((r, w))
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    except PermissionError:
        break
r, w = os.pipe()
print(fcntl.fcntl(w, 1032), flush=True)  # F_GETPIPE_SZ: a page or two, now that it is spent
time.sleep(4)
"""
PROBE = """
import fcntl, os
r, w = os.pipe()
print(fcntl.fcntl(w, 1032))  # F_GETPIPE_SZ: a full 64 KiB unless this uid is over its quota
"""


def test_containers_have_disjoint_ranges_and_do_not_share_per_uid_budgets() -> None:
    soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    assert 0 < soft <= 100 * 256, f"fs.pipe-user-pages-soft is {soft}: the hog cannot pass it"
    config = runner_config(PORT, "stockade-u-", pool_size=2, lean_pool_size=0,
                           max_body_kib=64)
    with own_runner(config) as runner:
        maps = _root_uids(runner)
        assert len(maps) == 2, maps
        firsts = sorted(int(m[1]) for m in maps.values())
        assert all(m[0] == "0" and m[2] == "65536" for m in maps.values()), maps
        assert firsts[1] - firsts[0] >= 65536, maps  # disjoint
        # One container's run holds more pipe buffer than its uid may; the other's run,
        # at the same time, still gets full-sized pipes.
        hog: list[Result] = []
        hogging = threading.Thread(target=lambda: hog.append(runner.run(HOG, wall_time_s=10)))
        hogging.start()
        try:
            time.sleep(1.5)
            probe = runner.run(PROBE)
        finally:
            hogging.join()
        # The quota bites for the hog's uid (the control), and not for the other's.
        assert hog[0].status == "ok" and int(hog[0].stdout) < 65536, hog
        assert probe.status == "ok" and probe.stdout.strip() == "65536", probe
