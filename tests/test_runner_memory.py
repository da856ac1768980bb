"""The pool's parent cgroup: every container sits under it, and its memory cap bounds them
all together, so the pool cannot take the host's memory even when each container is
within its own cap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stockade.result import Result
from stockade.runner import local
from stockade.runner.local import RunnerProcess
from stockade.runner.manager.lxc_cgroups import lxc_bases, pool_cgroup
from stockade.sandbox.cgroups import MOUNTINFO, parse_mountinfo
from support.runners import own_runner

PORT = 18095
POOL_MIB = 1024  # one container's cap (512 MiB largest run + 512 MiB overhead), for four


@pytest.fixture
def capped_runner() -> Iterator[RunnerProcess]:
    config = local.runner_config(PORT, "stockade-m-", pool_size=1, lean_pool_size=3,
                                 pool_memory_mib=POOL_MIB, queue_limit=8)
    with own_runner(config) as process:
        yield process


def _memory_dir(config_prefix: str) -> Path:
    """The pool's parent cgroup in the memory hierarchy (v1) or the unified one (v2)."""
    unified, v1 = parse_mountinfo(Path(MOUNTINFO).read_text())
    mount = v1.get("memory") or unified
    assert mount is not None, "no memory cgroup hierarchy"
    base = next(d for d in lxc_bases() if d.is_relative_to(mount))
    return base / pool_cgroup(config_prefix)


def test_every_container_sits_under_the_capped_pool_cgroup(
        capped_runner: RunnerProcess) -> None:
    config = capped_runner.config
    capped_runner.wait_for_full_pool(config.containers)
    parent = _memory_dir(config.container_prefix)
    cap = parent / ("memory.limit_in_bytes" if parent.joinpath("memory.limit_in_bytes").exists()
                    else "memory.max")
    assert int(cap.read_text()) == POOL_MIB << 20
    children = sorted(p.name for p in parent.iterdir() if p.is_dir())
    assert children == sorted(capped_runner.containers()), children


def test_the_pool_cap_bounds_containers_that_are_each_within_their_own(
        capped_runner: RunnerProcess) -> None:
    """Three runs of 400 MiB, each within its own and its container's cap, cannot all hold
    their memory at once under a 1 GiB pool: at least one is stopped as memory_limit. The
    containers' zygotes survive, and the next run is served."""
    capped_runner.wait_for_full_pool(capped_runner.config.containers)
    hold = ("import time\nb = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            "time.sleep(3)\nprint('held')")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results: list[Result] = list(pool.map(
            lambda _: capped_runner.run(hold, memory_mib=512, wall_time_s=10), range(3)))
    statuses = sorted(r.status for r in results)
    assert "memory_limit" in statuses, [(r.status, r.message) for r in results]
    assert set(statuses) <= {"ok", "memory_limit"}, [(r.status, r.message) for r in results]
    assert time.monotonic() - started < 30
    alone = capped_runner.run(hold, memory_mib=512, wall_time_s=10)
    assert (alone.status, alone.stdout) == ("ok", "held\n"), alone.message
