"""The hostile battery of the sandbox, sent through HTTP to a pool of LXC containers: each
probe gets its exact status or error, and the pool serves a clean run after every one."""

from __future__ import annotations

import json

import pytest

from stockade import environment
from stockade.runner.local import RunnerProcess
from support.battery import BATTERY, Context, Probe


@pytest.mark.parametrize("env", environment.names())
@pytest.mark.parametrize("probe", BATTERY, ids=[p.name for p in BATTERY])
def test_probe_is_contained_over_http(runner: RunnerProcess, ctx: Context, probe: Probe,
                                      env: str) -> None:
    """In every environment: another Debian release, another Python and its packages
    change what a run can reach for, never what confines it."""
    result = runner.run(probe.source(ctx), environment=env, **probe.limits)
    probe.check(result, ctx)
    assert runner.run("print('next')", environment=env).stdout == "next\n"


MOUNT_TABLE = """
import json
print(json.dumps([line.split(" - ", 1)[1].split()[1:] for line in open("/proc/self/mountinfo")]))
"""


def test_a_runs_mount_table_names_no_host_path(runner: RunnerProcess) -> None:
    """Every filesystem a run sees is named without a host path: the container's overlay
    was mounted with its layers named by descriptor, not by where they are on the host."""
    result = runner.run(MOUNT_TABLE)
    assert result.status == "ok", result
    mounts = json.loads(result.stdout)  # [source, super options] per mount
    overlays = [options for source, options in mounts if source == "stockade"]
    assert len(overlays) >= 2, mounts  # /usr and /etc at least
    for source, options in mounts:
        seen = f"{source} {options}"
        for host_path in (runner.config.lxc_path, "/var/lib", runner.config.run_dir):
            assert host_path not in seen, seen
    assert all("lowerdir=/proc/self/fd/" in options for options in overlays), overlays
