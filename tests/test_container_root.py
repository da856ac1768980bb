"""A pool container's root, the zygote's identity, keeps only the capabilities the zygote
uses and never gets the system calls no run or zygote needs. Proved from a process with
that root (`lxc-attach`), against a control that LXC leaves unrestricted: every probe that
fails under the container's policy succeeds (or fails differently) without it."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.runner.local import RunnerProcess
from stockade.runner.manager.container_policy import CAPABILITIES
from support.container_root import probe

CAP_NUMBERS = {"chown": 0, "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8,
               "sys_chroot": 18, "sys_admin": 21}
DENIED = ["unshare_user", "fsopen", "open_tree", "move_mount", "io_uring_setup", "keyctl",
          "add_key", "userfaultfd", "perf_event_open", "bpf", "netfilter_netlink"]


@pytest.fixture(scope="module")
def seen(runner: RunnerProcess) -> dict[str, dict[str, Any]]:
    runner.wait_for_full_pool(runner.config.all_containers)
    name = runner.containers()[0]
    return {"confined": probe(runner.config, name),
            "control": probe(runner.config, name, elevated=True)}


def test_the_probe_runs_as_the_containers_root(seen: dict[str, dict[str, Any]]) -> None:
    assert seen["confined"]["uid"] == 0 and seen["confined"]["seccomp"] == "2"
    assert seen["control"]["seccomp"] == "0"  # the control really is unrestricted


def test_container_root_keeps_only_what_the_zygote_uses(
        seen: dict[str, dict[str, Any]]) -> None:
    assert set(CAPABILITIES) == set(CAP_NUMBERS)
    assert seen["confined"]["cap_bnd"] == sum(1 << n for n in CAP_NUMBERS.values())
    assert seen["control"]["cap_bnd"] > seen["confined"]["cap_bnd"]


@pytest.mark.parametrize("call", DENIED)
def test_container_root_is_refused_what_no_run_or_zygote_uses(
        seen: dict[str, dict[str, Any]], call: str) -> None:
    assert seen["confined"][call] == "EPERM", seen["confined"]
    assert seen["control"][call] != "EPERM", f"{call}: the control cannot tell: {seen}"


def test_clone3_is_unknown_so_libc_falls_back_to_the_checkable_clone(
        seen: dict[str, dict[str, Any]]) -> None:
    assert seen["confined"]["clone3"] == "ENOSYS"
    assert seen["control"]["clone3"] != "ENOSYS"


def test_runs_still_work_under_the_container_policy(runner: RunnerProcess) -> None:
    result = runner.run("import os\nprint(os.getuid())")
    assert (result.status, result.stdout) == ("ok", "61000\n"), result.message
