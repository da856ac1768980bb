"""The hostile battery of the sandbox, sent through HTTP to a pool of LXC containers: each
probe gets its exact status or error, and the pool serves a clean run after every one."""

from __future__ import annotations

import pytest

from stockade.runner.local import RunnerProcess
from support.battery import BATTERY, Context, Probe


@pytest.mark.parametrize("probe", BATTERY, ids=[p.name for p in BATTERY])
def test_probe_is_contained_over_http(runner: RunnerProcess, ctx: Context, probe: Probe) -> None:
    result = runner.run(probe.source(ctx), **probe.limits)
    probe.check(result, ctx)
    assert runner.run("print('next')").stdout == "next\n"
