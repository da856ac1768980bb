"""The runner's systemd units: hardening properties hold in the running services, and the
split holds (stockade-runner: a root manager with no new privileges; stockade-front: the
HTTP front as the runner user with no capabilities, no network of its own, and a
`systemd-analyze security` exposure below 3)."""

from __future__ import annotations

import pytest
import testinfra.host

PROPERTIES = [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectClock", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallArchitectures", "native"),
    ("KillMode", "mixed"),
    ("Delegate", "yes"),
    ("LimitCORE", "0"),
    ("MemoryMax", str(1 << 30)),
    ("OOMScoreAdjust", "-500"),
    ("ProtectProc", "invisible"),
]
FRONT_PROPERTIES = [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("User", "stockade"),
    ("NoNewPrivileges", "yes"),
    ("PrivateNetwork", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX"),
    ("ProtectSystem", "strict"),
    ("PrivateDevices", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictNamespaces", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallArchitectures", "native"),
    ("MemoryMax", str(1 << 30)),
    ("PartOf", "stockade-runner.service"),
]
# systemd lists these in no fixed order.
ADDRESS_LISTS = [("IPAddressDeny", {"0.0.0.0/0", "::/0"}),
                 ("IPAddressAllow", {"127.0.0.0/8", "::1/128"})]


@pytest.fixture(scope="module")
def show(host: testinfra.host.Host) -> dict[str, str]:
    out = host.check_output("systemctl show stockade-runner")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def front_show(host: testinfra.host.Host) -> dict[str, str]:
    out = host.check_output("systemctl show stockade-front")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_runner_is_active_and_enabled(host: testinfra.host.Host) -> None:
    runner = host.service("stockade-runner")
    assert runner.is_running and runner.is_enabled
    assert host.service("stockade-front").is_running  # the manager's Wants= starts it


@pytest.mark.parametrize(("name", "expected"), FRONT_PROPERTIES,
                         ids=[p[0] for p in FRONT_PROPERTIES])
def test_front_unit_property(front_show: dict[str, str], name: str, expected: str) -> None:
    assert front_show[name] == expected


def exposure(host: testinfra.host.Host, unit: str) -> float:
    out = host.check_output(f"systemd-analyze security --no-pager {unit}")
    last = out.strip().splitlines()[-1]  # "→ Overall exposure level for UNIT: 0.6 SAFE 😀"
    return float(last.split(":", 1)[1].split()[0])


def test_the_front_scores_below_3_in_systemd_analyze_security(
        host: testinfra.host.Host) -> None:
    front, manager = exposure(host, "stockade-front.service"), \
        exposure(host, "stockade-runner.service")
    print(f"systemd-analyze security: front {front}, manager {manager}")
    assert front < 3.0, front


MCP_PROPERTIES = [
    ("User", "stockade-mcp"),
    ("NoNewPrivileges", "yes"),
    ("PrivateUsers", "yes"),
    ("ProtectSystem", "strict"),
    ("PrivateDevices", "yes"),
    ("ProtectProc", "invisible"),
    ("RestrictNamespaces", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("MemoryMax", str(512 << 20)),
]


@pytest.fixture(scope="module")
def mcp_show(host: testinfra.host.Host) -> dict[str, str]:
    out = host.check_output("systemctl show stockade-mcp")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_mcp_server_runs_confined_as_its_own_user(host: testinfra.host.Host,
                                                      mcp_show: dict[str, str]) -> None:
    mcp = host.service("stockade-mcp")
    assert mcp.is_running and mcp.is_enabled
    for name, expected in MCP_PROPERTIES:
        assert mcp_show[name] == expected, name
    assert set(mcp_show["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}
    status = process_status(host, mcp_show["MainPID"])
    assert {status[f"Cap{kind}"] for kind in ("Inh", "Prm", "Eff", "Bnd", "Amb")} == \
        {"0000000000000000"}, status
    assert status["NoNewPrivs"] == "1"
    score = exposure(host, "stockade-mcp.service")
    print(f"systemd-analyze security: mcp {score}")
    assert score < 3.0, score


def test_the_front_has_no_network_of_its_own(host: testinfra.host.Host,
                                             front_show: dict[str, str]) -> None:
    """Behaviour: another network namespace, holding loopback alone; it serves through the
    listener the manager made in the host's namespace (the API tests go through it)."""
    pid = front_show["MainPID"]
    assert host.check_output(f"readlink /proc/{pid}/ns/net") != \
        host.check_output("readlink /proc/1/ns/net")
    devices = host.file(f"/proc/{pid}/net/dev").content_string.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]


@pytest.mark.parametrize(("name", "expected"), PROPERTIES, ids=[p[0] for p in PROPERTIES])
def test_unit_property(show: dict[str, str], name: str, expected: str) -> None:
    assert show[name] == expected


@pytest.mark.parametrize(("name", "expected"), ADDRESS_LISTS, ids=[p[0] for p in ADDRESS_LISTS])
def test_unit_talks_to_loopback_only(show: dict[str, str], name: str,
                                     expected: set[str]) -> None:
    assert set(show[name].split()) == expected


def test_system_call_filter_denies_the_dangerous_groups(show: dict[str, str]) -> None:
    """A deny-list (leading ~): none of these calls is in it as allowed."""
    denied = show["SystemCallFilter"]
    assert denied.startswith("~")
    for call in ("kexec_load", "init_module", "reboot", "swapon", "settimeofday", "ptrace",
                 "iopl", "perf_event_open"):
        assert call in denied.split(), call


def test_capability_bounding_set_leaves_out_what_no_part_needs(show: dict[str, str]) -> None:
    kept = set(show["CapabilityBoundingSet"].split())
    for cap in ("cap_sys_module", "cap_sys_rawio", "cap_sys_time", "cap_sys_boot",
                "cap_net_raw", "cap_bpf", "cap_perfmon", "cap_syslog", "cap_ipc_lock"):
        assert cap not in kept, cap
    assert "cap_sys_admin" in kept  # LXC: containers are namespaces and mounts


def test_only_state_and_runtime_paths_are_writable(show: dict[str, str]) -> None:
    assert show["ReadWritePaths"].split() == ["/var/lib/stockade"]
    assert sorted(show["RuntimeDirectory"].split()) == ["lxc", "stockade"]


def process_status(host: testinfra.host.Host, pid: str) -> dict[str, str]:
    text = host.file(f"/proc/{pid}/status").content_string
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_manager_runs_with_no_new_privs_and_seccomp(host: testinfra.host.Host,
                                                    show: dict[str, str]) -> None:
    """Behaviour: the kernel holds the unit's settings for the live process."""
    status = process_status(host, show["MainPID"])
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["CapBnd"], 16) & (1 << 16) == 0  # CAP_SYS_MODULE


def test_http_front_is_the_runner_user_without_capabilities(
        host: testinfra.host.Host, front_show: dict[str, str]) -> None:
    status = process_status(host, front_show["MainPID"])
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1"
    assert status["Uid"].split()[0] == str(host.user("stockade").uid)
    assert status["Seccomp"] == "2"


def test_service_cannot_write_outside_its_paths(host: testinfra.host.Host,
                                                show: dict[str, str]) -> None:
    """Behaviour: in the service's own mount namespace /usr is read-only."""
    tried = host.run(f"nsenter --target {show['MainPID']} --mount touch /usr/stockade-probe")
    assert tried.rc != 0 and "Read-only file system" in tried.stderr


def test_a_start_returns_once_the_pool_is_warm(host: testinfra.host.Host) -> None:
    """Type=notify: READY=1 comes when every container is up, so right after `systemctl
    restart` returns, /readyz is 200 (the rolling replacement relies on it)."""
    ready = host.run("systemctl restart stockade-runner && /opt/stockade/venv/bin/python -c "
                     "'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:8080"
                     "/readyz\", timeout=5).status)'")
    assert ready.rc == 0 and ready.stdout.strip() == "200", ready.stderr
    status = host.check_output("systemctl show -p StatusText --value stockade-runner")
    assert status.startswith("serving with "), status
