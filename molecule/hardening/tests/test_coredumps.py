"""No core dumps: not for services, not for sessions, not for set-id programs."""

from __future__ import annotations

import testinfra.host


def test_systemd_gives_services_no_core_limit(host: testinfra.host.Host) -> None:
    """systemd re-executed with DefaultLimitCORE=0, so every service starts with it."""
    out = host.check_output("systemctl show --property DefaultLimitCORE")
    assert out == "DefaultLimitCORE=0"


def test_a_new_service_cannot_dump_core(host: testinfra.host.Host) -> None:
    """Behaviour: a process started as a service has a core size limit of 0."""
    host.check_output("systemd-run --unit stockade-test-core sleep 60")
    try:
        pid = host.check_output("systemctl show --property MainPID --value stockade-test-core")
        limits = host.file(f"/proc/{pid}/limits").content_string
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        host.run("systemctl stop stockade-test-core")


def test_sessions_get_a_hard_zero_core_limit(host: testinfra.host.Host) -> None:
    limits = host.file("/etc/security/limits.d/10-stockade-no-core.conf").content_string
    assert "* hard core 0" in limits


def test_systemd_coredump_keeps_nothing(host: testinfra.host.Host) -> None:
    conf = host.file("/etc/systemd/coredump.conf.d/10-stockade-no-core.conf").content_string
    assert "Storage=none" in conf and "ProcessSizeMax=0" in conf
