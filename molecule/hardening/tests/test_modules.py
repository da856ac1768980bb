"""Kernel modules no stockade host uses cannot be loaded: modprobe runs /bin/false."""

from __future__ import annotations

import pytest
import testinfra.host

FILE = "/etc/modprobe.d/stockade-blocked.conf"
# The block list of roles/hardening/defaults/main.yml (hardening_blocked_modules).
BLOCKED = ["dccp", "sctp", "rds", "tipc", "n_hdlc", "ax25", "netrom", "rose", "x25",
           "appletalk", "psnap", "p8022", "can", "atm", "ieee802154", "llc2", "cramfs",
           "freevxfs", "jffs2", "hfs", "hfsplus", "vivid"]


@pytest.fixture(scope="module")
def config(host: testinfra.host.Host) -> str:
    """modprobe's own view of its configuration, every file of modprobe.d merged."""
    return str(host.check_output("modprobe --showconfig"))


@pytest.mark.parametrize("module", BLOCKED)
def test_modprobe_runs_false_in_place_of_the_module(config: str, module: str) -> None:
    assert f"install {module} /bin/false" in config.splitlines(), module
    assert f"blacklist {module}" in config.splitlines(), module


def test_a_blocked_module_does_not_load(host: testinfra.host.Host) -> None:
    """Behaviour, on a booted host: asking for dccp (a socket of its family would) fails,
    and it is not loaded."""
    if host.run("systemd-detect-virt --container").rc == 0:
        pytest.skip("a container shares its host's kernel modules; `make image-test` "
                    "loads on a booted VM")
    assert host.run("modprobe dccp").rc != 0
    assert "dccp" not in host.check_output("cut -d' ' -f1 /proc/modules").split()
