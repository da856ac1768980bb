"""Each confinement layer alone switched off (test-only launcher): the battery notices."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from support.battery import BY_NAME, Context
from support.leftovers import leftovers_seen
from support.sandbox import Sandbox

# layer -> the probes that must notice it missing
NOTICED_BY = {
    "pid": ["sees_only_its_own_pids"],
    "ipc": ["sysv_queue_of_host"],
    "uts": ["hostname"],
    "net": ["abstract_unix_socket_of_host"],
    "filesystem": ["write_outside_workdir", "dev_shm_of_host"],
    "rlimits": ["fd_exhaustion", "rlimits_in_force"],
    "identity": ["status_flags", "read_etc_shadow", "zygote_proc_kept_from_run"],
    "securebits": ["status_flags"],
    "capabilities": ["status_flags"],
    "no_new_privs": ["status_flags"],
    "seccomp": ["ptrace_traceme", "keyctl", "x32_syscall", "socket_netlink"],
    "fds": ["no_inherited_fds"],
    "environment": ["environment_whitelisted"],
    "memory": ["memory_bomb_bytearray"],
    "pids": ["fork_until_refused"],
}



@pytest.mark.parametrize("layer", sorted(NOTICED_BY))
def test_battery_notices_missing_layer(weak_sandbox: Callable[[str], Sandbox], ctx: Context,
                                       layer: str) -> None:
    box = weak_sandbox(layer)
    for name in NOTICED_BY[layer]:
        probe = BY_NAME[name]
        result = box.run(probe.source(ctx), **probe.limits)
        with pytest.raises(AssertionError):
            probe.check(result, ctx)


@pytest.mark.parametrize("layer", ["filesystem", "pid"])
def test_leftover_check_notices_missing_layer(weak_sandbox: Callable[[str], Sandbox],
                                              layer: str) -> None:
    assert leftovers_seen(weak_sandbox(layer)), f"no leftovers seen with {layer} off"
