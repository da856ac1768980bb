"""Runs submitted through nginx report their own confinement: seccomp, no_new_privs, no
capabilities, a non-root uid, the configured rlimits, their container's cgroup caps."""

from __future__ import annotations

import json
from typing import Any

import pytest
import testinfra.host

from api import post_run
from conftest import Instance

# The scenario's runner_settings (molecule.yml): default and maximum limits.
DEFAULT_CPU_S, DEFAULT_FSIZE_KIB = 2, 1024
MAX_MEMORY_MIB, MAX_PROCESSES, OVERHEAD_MIB = 512, 64, 512
# The sandbox's own per-process ceilings (SandboxConfig defaults).
NOFILE, NPROC, STACK_MIB = 256, 512, 8

REPORT = """
import json
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
limits = {}
for line in open("/proc/self/limits").read().splitlines()[1:]:
    name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
    limits[name] = [soft, hard]
print(json.dumps({"status": {k: v.strip() for k, v in status.items()}, "limits": limits,
                  "cgroup": open("/proc/self/cgroup").read()}))
"""


@pytest.fixture(scope="module")
def report(instance: Instance) -> dict[str, Any]:
    record = post_run(instance, REPORT)
    assert record["status"] == "ok", record
    result: dict[str, Any] = json.loads(record["stdout"])
    return result


def test_seccomp_filter_is_on(report: dict[str, Any]) -> None:
    assert report["status"]["Seccomp"] == "2"


def test_no_new_privs_is_set(report: dict[str, Any]) -> None:
    assert report["status"]["NoNewPrivs"] == "1"


@pytest.mark.parametrize("capability_set", ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"])
def test_no_capabilities_at_all(report: dict[str, Any], capability_set: str) -> None:
    assert int(report["status"][capability_set], 16) == 0


def test_runs_as_a_non_root_uid_and_gid(report: dict[str, Any]) -> None:
    uids = report["status"]["Uid"].split()
    gids = report["status"]["Gid"].split()
    assert "0" not in uids and "0" not in gids
    assert len(set(uids)) == 1 and len(set(gids)) == 1  # real, effective, saved, fs


@pytest.mark.parametrize(("name", "expected"), [
    ("Max cpu time", [str(DEFAULT_CPU_S), str(DEFAULT_CPU_S + 1)]),  # SIGXCPU, then SIGKILL
    ("Max file size", [str(DEFAULT_FSIZE_KIB * 1024)] * 2),
    ("Max open files", [str(NOFILE)] * 2),
    ("Max processes", [str(NPROC)] * 2),
    ("Max stack size", [str(STACK_MIB << 20)] * 2),
    ("Max core file size", ["0", "0"]),
    ("Max locked memory", ["0", "0"]),
    ("Max file locks", ["0", "0"]),
    ("Max msgqueue size", ["0", "0"]),
    ("Max realtime priority", ["0", "0"]),
])
def test_rlimits_are_the_configured_ones(report: dict[str, Any], name: str,
                                         expected: list[str]) -> None:
    assert report["limits"][name] == expected


def test_a_request_s_own_limits_reach_the_rlimits(instance: Instance) -> None:
    record = post_run(instance, REPORT, cpu_time_s=5, file_size_kib=2048)
    limits = json.loads(record["stdout"])["limits"]
    assert limits["Max cpu time"] == ["5", "6"]
    assert limits["Max file size"] == [str(2048 * 1024)] * 2


def test_each_run_is_in_a_cgroup_of_its_own(report: dict[str, Any]) -> None:
    """Below its container's: the run's memory and pids caps are its own."""
    lines = report["cgroup"].splitlines()
    memory = next(line for line in lines if ":memory:" in line or line.startswith("0::"))
    assert memory.rsplit(":", 1)[1] not in ("", "/"), lines


def container_cgroups(host: testinfra.host.Host) -> dict[str, tuple[int, int]]:
    """(memory bytes, pids) caps of every pool container, read where the runner set them."""
    v2 = host.file("/sys/fs/cgroup/cgroup.controllers").exists
    pattern = "/sys/fs/cgroup/lxc.payload.stockade-pool-*" if v2 else \
        "/sys/fs/cgroup/memory/lxc.payload.stockade-pool-*"
    found = {}
    for path in host.check_output(f"ls -d {pattern}").split():
        name = path.rsplit("/", 1)[1]
        if v2:
            memory = host.file(f"{path}/memory.max").content_string.strip()
            pids = host.file(f"{path}/pids.max").content_string.strip()
        else:
            memory = host.file(f"{path}/memory.limit_in_bytes").content_string.strip()
            pids = host.file(f"/sys/fs/cgroup/pids/{name}/pids.max").content_string.strip()
        found[name] = (int(memory), int(pids))
    return found


def test_every_pool_container_has_the_configured_cgroup_caps(
        host: testinfra.host.Host) -> None:
    caps = container_cgroups(host)
    assert len(caps) >= 2, caps  # a full and a lean container
    expected = ((MAX_MEMORY_MIB + OVERHEAD_MIB) << 20, MAX_PROCESSES + 64)
    assert set(caps.values()) == {expected}, caps
