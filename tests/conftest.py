"""Fixtures: real zygotes (normal and, for the layer tests, weakened) on this host."""

from __future__ import annotations

import itertools
import os
import platform
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.limits import LimitPolicy, Limits
from stockade.result import Result
from stockade.sandbox import client
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.launcher import DEFAULT_COMMAND, ZygoteProcess

TESTS = Path(__file__).parent
WEAK_ZYGOTE = str(TESTS / "support" / "weak_zygote.py")
_uids = itertools.count(61100)

RunFn = Callable[..., Result]


def pytest_sessionstart(session: pytest.Session) -> None:
    # Fail loudly, never skip: these tests are about real namespaces, cgroups and seccomp.
    problems = []
    if os.geteuid() != 0:
        problems.append("the tests must run as root (namespaces, mounts, cgroups)")
    if platform.machine() != "x86_64":
        problems.append(f"the syscall probes are written for x86_64, not {platform.machine()}")
    if problems:
        pytest.exit("; ".join(problems), returncode=1)


def make_config(state: str, name: str, **overrides: Any) -> SandboxConfig:
    uid = next(_uids)
    values: dict[str, Any] = {
        "socket_path": f"{state}/zygote.sock", "state_dir": state, "name": name,
        "run_uid": uid, "run_gid": uid, "preload": ["json"],
        "limits": LimitPolicy(maximum=Limits(cpu_time_s=10, wall_time_s=20, memory_mib=1024,
                                             processes=64, output_kib=1024,
                                             file_size_kib=65536)),
    }
    values.update(overrides)
    return SandboxConfig(**values)


class Sandbox:
    """A running zygote and one connection to it."""

    def __init__(self, config: SandboxConfig, command: tuple[str, ...] = DEFAULT_COMMAND):
        self.config = config
        self.process = ZygoteProcess(config, command=command)
        self.process.start()
        self.sock: socket.socket = self.process.connect()

    def run(self, code: str, stdin: bytes = b"", args: list[str] | None = None,
            files: list[client.protocol.InputFile] | None = None, **limits: Any) -> Result:
        resolved = self.config.limits.resolve(limits)
        job = client.Job(code=code, stdin=stdin, args=args or [], files=files or [])
        return client.run(self.sock, job, resolved)

    def close(self) -> None:
        self.sock.close()
        self.process.stop()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with tempfile.TemporaryDirectory(prefix="stockade-test-") as state:
        box = Sandbox(make_config(state, "pytest"))
        try:
            yield box
        finally:
            box.close()


@pytest.fixture
def weak_sandbox() -> Iterator[Callable[[str], Sandbox]]:
    """Start a zygote with one confinement layer switched off (test-only launcher)."""
    started: list[tuple[Sandbox, tempfile.TemporaryDirectory[str]]] = []

    def start(layer: str) -> Sandbox:
        state = tempfile.TemporaryDirectory(prefix=f"stockade-weak-{layer}-")
        box = Sandbox(make_config(state.name, f"weak-{layer}"),
                      command=(sys.executable, "-I", WEAK_ZYGOTE, layer))
        started.append((box, state))
        return box

    yield start
    for box, state in started:
        box.close()
        state.cleanup()
