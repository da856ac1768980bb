"""fail2ban: failed ssh logins made here get this host's address banned by nftables."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import testinfra.host

from conftest import Instance


def banned(host: testinfra.host.Host) -> list[str]:
    out = host.check_output("fail2ban-client status sshd")
    match = re.search(r"Banned IP list:\s*(.*)", out)
    return match.group(1).split() if match else []


def our_address(instance: Instance) -> str:
    """The address the container sees us at (lxcbr0's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((instance.ip, 9))
        return str(probe.getsockname()[0])


@pytest.fixture
def unban_afterwards(host: testinfra.host.Host, instance: Instance) -> Iterator[str]:
    """Lift the ban, also one that failures still in the journal would bring back."""
    address = our_address(instance)
    host.run(f"fail2ban-client set sshd unbanip {address}")
    try:
        yield address
    finally:
        deadline = time.monotonic() + 30
        while True:
            host.run(f"fail2ban-client set sshd unbanip {address}")
            time.sleep(2)
            if address not in banned(host) and instance.connect(22, 2) == "open":
                break
            assert time.monotonic() < deadline, f"{address} is still banned"


def test_fail2ban_runs_the_sshd_jail_on_the_journal(host: testinfra.host.Host) -> None:
    assert host.service("fail2ban").is_running and host.service("fail2ban").is_enabled
    assert "sshd" in host.check_output("fail2ban-client status")
    jail = host.file("/etc/fail2ban/jail.d/stockade.local").content_string
    assert "backend = systemd" in jail and "banaction = nftables-multiport" in jail


@pytest.mark.bans_this_host
@pytest.mark.direct_network
def test_failed_logins_get_the_address_banned(host: testinfra.host.Host, instance: Instance,
                                               unban_afterwards: str) -> None:
    address = unban_afterwards
    for attempt in range(8):
        with contextlib.suppress(subprocess.TimeoutExpired):  # the ban can land mid-login
            instance.ssh("true", user=f"nosuchuser{attempt}", timeout=10)
        if address in banned(host):
            break
    deadline = time.monotonic() + 20
    while address not in banned(host):
        assert time.monotonic() < deadline, "fail2ban did not ban after 8 failed logins"
        time.sleep(0.5)
    # The ban is an nftables rule, and it holds: ssh from here is now refused.
    assert address in host.check_output("nft list ruleset")
    assert instance.connect(22) in ("refused", "dropped")
