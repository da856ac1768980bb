"""Runs submitted through nginx report their own confinement: seccomp, no_new_privs, no
capabilities, a non-root uid, the configured rlimits, their container's cgroup caps."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
import testinfra.host

from api import post_run
from conftest import Caller

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
def config(host: testinfra.host.Host) -> dict[str, Any]:
    """The host's runner config in full (defaults filled in), as the runner reads it."""
    result: dict[str, Any] = json.loads(host.check_output(
        "/opt/stockade/venv/bin/stockade check-config /etc/stockade/runner.json"))
    return result


@pytest.fixture(scope="module")
def report(caller: Caller) -> dict[str, Any]:
    record = post_run(caller, REPORT)
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


def expected_rlimit(config: dict[str, Any], name: str) -> list[str]:
    default = config["limits"]["default"]
    cpu_s = int(default["cpu_time_s"])
    return {
        "Max cpu time": [str(cpu_s), str(cpu_s + 1)],  # SIGXCPU, then SIGKILL
        "Max file size": [str(default["file_size_kib"] * 1024)] * 2,
        "Max open files": [str(NOFILE)] * 2,
        "Max processes": [str(NPROC)] * 2,
        "Max stack size": [str(STACK_MIB << 20)] * 2,
    }.get(name, ["0", "0"])


@pytest.mark.parametrize("name", [
    "Max cpu time", "Max file size", "Max open files", "Max processes", "Max stack size",
    "Max core file size", "Max locked memory", "Max file locks", "Max msgqueue size",
    "Max realtime priority",
])
def test_rlimits_are_the_configured_ones(report: dict[str, Any], config: dict[str, Any],
                                         name: str) -> None:
    assert report["limits"][name] == expected_rlimit(config, name)


def test_a_request_s_own_limits_reach_the_rlimits(caller: Caller) -> None:
    record = post_run(caller, REPORT, cpu_time_s=5, file_size_kib=2048)
    limits = json.loads(record["stdout"])["limits"]
    assert limits["Max cpu time"] == ["5", "6"]
    assert limits["Max file size"] == [str(2048 * 1024)] * 2


def test_each_run_is_in_a_cgroup_of_its_own(report: dict[str, Any]) -> None:
    """Below its container's: the run's memory and pids caps are its own."""
    lines = report["cgroup"].splitlines()
    memory = next(line for line in lines if ":memory:" in line or line.startswith("0::"))
    assert memory.rsplit(":", 1)[1] not in ("", "/"), lines


POOL = "stockade-pool"  # the pool's parent cgroup: the container prefix, less its dash


def pool_parent(host: testinfra.host.Host) -> tuple[bool, str]:
    """(cgroup v2?, the pool's parent cgroup in the memory hierarchy)."""
    v2 = host.file("/sys/fs/cgroup/cgroup.controllers").exists
    return v2, f"/sys/fs/cgroup/{POOL}" if v2 else f"/sys/fs/cgroup/memory/{POOL}"


def container_cgroups(host: testinfra.host.Host) -> dict[str, tuple[int, int]]:
    """(memory bytes, pids) caps of every pool container, read where the runner set them."""
    v2, parent = pool_parent(host)
    found = {}
    for path in host.check_output(f"ls -d {parent}/{POOL}-*").split():
        name = path.rsplit("/", 1)[1]
        if v2:
            memory = host.file(f"{path}/memory.max").content_string.strip()
            pids = host.file(f"{path}/pids.max").content_string.strip()
        else:
            memory = host.file(f"{path}/memory.limit_in_bytes").content_string.strip()
            pids = host.file(f"/sys/fs/cgroup/pids/{POOL}/{name}/pids.max").content_string.strip()
        found[name] = (int(memory), int(pids))
    return found


def test_the_pool_cgroup_caps_every_container_together(host: testinfra.host.Host,
                                                      config: dict[str, Any]) -> None:
    """The host's memory less the reserve, unless the config names a smaller cap."""
    v2, parent = pool_parent(host)
    cap = int(host.file(f"{parent}/{'memory.max' if v2 else 'memory.limit_in_bytes'}")
              .content_string.strip())
    total_mib = int(host.check_output("awk '/^MemTotal:/ {print $2}' /proc/meminfo")) // 1024
    expected = config["pool_memory_mib"] or total_mib - config["memory_reserve_mib"]
    assert cap == expected << 20, (cap, expected)


def test_every_pool_container_has_the_configured_cgroup_caps(
        host: testinfra.host.Host, config: dict[str, Any]) -> None:
    caps = container_cgroups(host)
    assert len(caps) >= 2, caps  # a full and a lean container
    maximum = config["limits"]["maximum"]
    expected = ((maximum["memory_mib"] + config["container_memory_overhead_mib"]) << 20,
                maximum["processes"] + 64)
    assert set(caps.values()) == {expected}, caps


CONTAINER_ROOT = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
read, write = os.pipe()
if os.fork() == 0:  # unshare changes the caller: try it in a child
    ok = libc.syscall(272, 0x10000000) == 0  # unshare(CLONE_NEWUSER)
    os.write(write, b"allowed" if ok else errno.errorcode[ctypes.get_errno()].encode())
    os._exit(0)
os.wait()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mounted = any(line.split()[4] == "/dev/.lxc/proc" for line in open("/proc/self/mountinfo"))
try:
    open("/dev/.lxc/proc/1/status").read()
    lxc_proc = "readable"
except OSError as exc:
    lxc_proc = errno.errorcode[exc.errno]
print(json.dumps({"uid": os.getuid(), "cap_bnd": int(status["CapBnd"], 16),
                  "seccomp": status["Seccomp"].strip(), "unshare_user": os.read(read, 64).decode(),
                  "lxc_proc_mounted": mounted, "lxc_proc": lxc_proc}))
"""
# chown kill setgid setuid setpcap sys_chroot sys_admin (runner/manager/container_policy.py)
CONTAINER_CAPS = sum(1 << n for n in (0, 5, 6, 7, 8, 18, 21))


@pytest.fixture(scope="module")
def container_root(host: testinfra.host.Host) -> dict[str, Any]:
    """What a process with a pool container's root sees and may do (lxc-attach)."""
    lxc_path = "/var/lib/stockade/containers"
    names = host.check_output(f"lxc-ls -1 -P {lxc_path}").split()
    pool = [name for name in names if name.startswith("stockade-pool-")]
    assert pool, names
    out = host.check_output(f"lxc-attach -P {lxc_path} -n {pool[0]} --clear-env -- "
                            f"/usr/bin/python3 -I -c {shlex.quote(CONTAINER_ROOT)}")
    seen: dict[str, Any] = json.loads(out)
    return seen


def test_container_root_keeps_only_the_zygotes_capabilities_and_its_profile(
        container_root: dict[str, Any]) -> None:
    assert container_root["uid"] == 0 and container_root["seccomp"] == "2"
    assert container_root["cap_bnd"] == CONTAINER_CAPS, hex(container_root["cap_bnd"])
    assert container_root["unshare_user"] == "EPERM"


def test_container_root_cannot_read_lxcs_unobstructed_proc(
        host: testinfra.host.Host, container_root: dict[str, Any]) -> None:
    """LXC's optional unobstructed proc at /dev/.lxc/proc: either it is not there at all,
    or (where it is) AppArmor denies reading through it."""
    if not container_root["lxc_proc_mounted"]:
        assert container_root["lxc_proc"] == "ENOENT", container_root
        return
    if host.run("grep -qx Y /sys/module/apparmor/parameters/enabled").rc != 0:
        pytest.skip("LXC mounted /dev/.lxc/proc, and this kernel enforces no AppArmor (a "
                    "container on a host without it); `make image-test` checks a VM that does")
    assert container_root["lxc_proc"] == "EACCES", container_root


def test_a_runs_mount_table_names_no_host_path(caller: Caller) -> None:
    """The container's overlay is mounted with its layers named by descriptor: no mount a
    run sees names where anything is on the host."""
    out = post_run(caller, "import json; print(json.dumps([line.split(' - ', 1)[1].split()"
                           "[1:] for line in open('/proc/self/mountinfo')]))")
    assert out["status"] == "ok", out
    mounts = json.loads(out["stdout"])
    assert [options for source, options in mounts if source == "stockade"], mounts
    for source, options in mounts:
        assert "/var/lib" not in f"{source} {options}", (source, options)
