"""Testinfra for the Molecule scenarios and the image test.

A Molecule host is an LXC container reached with lxc-attach: testinfra's own `lxc` backend
drives LXD's `lxc exec`, and its ansible backend would run a whole ansible process per
command; lxc-attach runs each command in the container directly. The image test
(`make image-test`) records a booted VM instead: reached over ssh, its ports forwarded to
this host's loopback by qemu's user-mode network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import testinfra.host
import yaml
from testinfra.backend import base

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LxcAttachBackend(base.BaseBackend):
    """Runs a command inside an LXC container (classic LXC, not LXD) as its root."""

    NAME = "lxc-attach"

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        super().__init__(name, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        out = self.run_local("lxc-attach -n %s --clear-env --set-var PATH=%s -- /bin/sh -c %s",
                             self.name, PATH, cmd)
        out.command = self.encode(cmd)
        return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bans_this_host: makes the instance ban this host's "
                            "address for a while; runs after every other test")
    config.addinivalue_line("markers", "direct_network: needs packets from this host to reach "
                            "the instance unproxied (not through qemu's port forwards)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A ban can outlive its unban (failures still in the journal are counted again), so
    the tests that ban this host come last, after every test that logs in."""
    items.sort(key=lambda item: item.get_closest_marker("bans_this_host") is not None)


def free_port() -> int:
    """A TCP port free on this host's loopback, for a listener or a forward to bind."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse_release(text: str) -> dict[str, str]:
    """/etc/stockade-release (KEY=value lines, os-release style) as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith("#"))


SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR")


@dataclasses.dataclass(frozen=True)
class Instance:
    """A scenario's container as create.yml recorded it, or the image test's VM."""

    name: str
    ip: str
    identity_file: Path
    # How testinfra reaches it: "lxc" (lxc-attach) or "ssh".
    backend: str = "lxc"
    # The instance's port -> the port on `ip` that reaches it (qemu's forwards).
    ports: Mapping[int, int] = dataclasses.field(default_factory=dict)

    def port(self, port: int) -> int:
        return self.ports.get(port, port)

    def url(self, path: str) -> str:
        return f"http://{self.ip}:{self.port(80)}{path}"

    def connect(self, port: int, timeout: float = 3.0) -> str:
        """A TCP connect from this host: 'open', 'refused' (a RST: nothing listens, nothing
        filters), 'dropped' (silence) or 'unreachable' (any other error)."""
        try:
            with socket.create_connection((self.ip, self.port(port)), timeout=timeout):
                return "open"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "dropped"
        except OSError:
            return "unreachable"

    def ssh(self, command: str, *options: str, user: str = "root", key: Path | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """ssh from this (the Molecule) host to the instance."""
        # ssh takes the first value of an option: the caller's come before the defaults.
        argv = ["ssh", "-F", "/dev/null", *options, *SSH_OPTIONS,
                "-i", str(key or self.identity_file), "-p", str(self.port(22)),
                f"{user}@{self.ip}", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)


def _instances() -> list[Instance]:
    config = os.environ.get("MOLECULE_INSTANCE_CONFIG")
    if not config:
        raise pytest.UsageError("run these tests through `molecule verify` (no "
                                "MOLECULE_INSTANCE_CONFIG)")
    records = yaml.safe_load(Path(config).read_text())
    return [Instance(r["instance"], r["ip"], Path(r["identity_file"]),
                     r.get("backend", "lxc"),
                     {int(k): int(v) for k, v in r.get("ports", {}).items()})
            for r in records]


@pytest.fixture(scope="session")
def instance() -> Instance:
    found = _instances()
    assert len(found) == 1, f"the scenarios run one host each, found {found}"
    return found[0]


@pytest.fixture(scope="session")
def host(instance: Instance) -> testinfra.host.Host:
    if instance.backend == "ssh":
        # One connection for every command (a master), as the host rate-limits new ssh
        # connections per source. It exits 60 s after the last command.
        return testinfra.get_host(f"ssh://root@{instance.ip}:{instance.port(22)}",
                                  ssh_identity_file=str(instance.identity_file),
                                  ssh_extra_args=shlex.join(SSH_OPTIONS),
                                  controlpath=f"/tmp/stockade-testinfra-{os.getpid()}")
    return testinfra.host.Host(LxcAttachBackend(instance.name))


STOCKADE = "/opt/stockade/venv/bin/stockade"


@dataclasses.dataclass(frozen=True)
class Caller:
    """A client of the instance's API through its nginx, with an API key (or none)."""

    instance: Instance
    key: str | None

    def request(self, path: str, body: Any = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(self.instance.url(path), data=data, headers=headers)


def api_key_name() -> str:
    return f"testinfra-{os.getpid()}"


@pytest.fixture(scope="session")
def api_key(host: testinfra.host.Host) -> Iterator[str]:
    """A key made on the host with `stockade keys add`, as its operator would; revoked after."""
    name = api_key_name()
    key = host.check_output(f"{STOCKADE} keys add {name} --scope runs --scope metrics")
    yield key.strip()
    host.run(f"{STOCKADE} keys revoke {name}")


@pytest.fixture(scope="session")
def caller(instance: Instance, api_key: str) -> Caller:
    return Caller(instance, api_key)
