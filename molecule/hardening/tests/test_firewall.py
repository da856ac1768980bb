"""nftables: inbound dropped by default; ssh and the web ports answer. Proven from the
Molecule host over lxcbr0 against listeners this test starts in the container."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import testinfra.host

from conftest import Instance

OPEN_PORT, CLOSED_PORT = 80, 8081


def listens_on_loopback(host: testinfra.host.Host, port: int, timeout: float) -> bool:
    """Inside the container, where the firewall lets loopback through."""
    return host.run(f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
                    f"{port}), {timeout})\"").rc == 0


@pytest.fixture(scope="module")
def listeners(host: testinfra.host.Host) -> Iterator[None]:
    """Listeners on an allowed and on a not-allowed port, both on every address, where
    nothing listens yet (a whole host has nginx on 80)."""
    started = [port for port in (OPEN_PORT, CLOSED_PORT)
               if not listens_on_loopback(host, port, 1)]
    for port in started:
        host.check_output(f"systemd-run --unit stockade-test-listen-{port} "
                          f"python3 -m http.server --bind 0.0.0.0 {port}")
    for port in started:
        deadline = time.monotonic() + 15
        while not listens_on_loopback(host, port, 1):
            assert time.monotonic() < deadline, f"listener on {port} did not start"
            time.sleep(0.3)
    try:
        yield
    finally:
        for port in started:
            host.run(f"systemctl stop stockade-test-listen-{port}")


def test_ruleset_is_loaded_with_drop_policies(host: testinfra.host.Host) -> None:
    ruleset = json.loads(host.check_output("nft --json list table inet stockade"))
    chains = {item["chain"]["name"]: item["chain"] for item in ruleset["nftables"]
              if "chain" in item}
    assert chains["input"]["policy"] == "drop"
    assert chains["forward"]["policy"] == "drop"
    assert chains["input"]["hook"] == "input"


def test_ruleset_is_loaded_at_boot(host: testinfra.host.Host) -> None:
    assert host.service("nftables").is_enabled
    assert "table inet stockade" in host.file("/etc/nftables.conf").content_string


@pytest.mark.direct_network
@pytest.mark.usefixtures("listeners")
def test_port_not_allowed_is_dropped_though_something_listens(
        host: testinfra.host.Host, instance: Instance) -> None:
    assert instance.connect(CLOSED_PORT) == "dropped"
    assert listens_on_loopback(host, CLOSED_PORT, 2)  # the listener is there


@pytest.mark.usefixtures("listeners")
def test_web_port_answers(instance: Instance) -> None:
    assert instance.connect(OPEN_PORT) == "open"


def test_ssh_answers(instance: Instance) -> None:
    assert instance.connect(22) == "open"
