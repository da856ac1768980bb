"""Every hostile probe, against a normal zygote: each gets its exact status or error."""

from __future__ import annotations

import pytest

from support.battery import BATTERY, Context, Probe
from support.sandbox import Sandbox


@pytest.mark.parametrize("probe", BATTERY, ids=[p.name for p in BATTERY])
def test_probe_is_contained(sandbox: Sandbox, ctx: Context, probe: Probe) -> None:
    result = sandbox.run(probe.source(ctx), **probe.limits)
    probe.check(result, ctx)
    # Whatever the probe did, the zygote still serves a clean run next.
    assert sandbox.run("print('next')").stdout == "next\n"
