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

from battery import Context, host_context
from stockade.limits import LimitPolicy, Limits
from stockade.result import Result
from stockade.runner.config import RunnerConfig
from stockade.runner.containers import Containers
from stockade.sandbox import client
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.launcher import DEFAULT_COMMAND, ZygoteProcess
from support import service
from support.service import NginxProcess, RunnerProcess

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
def ctx() -> Iterator[Context]:
    """Listeners and objects on the host that the battery's probes try to reach."""
    with host_context() as context:
        yield context


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


# -- the runner end to end: real LXC containers, real nginx ---------------------------------

RUNNER_PORT, NGINX_PORT = 18080, 18081


def runner_leftovers(config: RunnerConfig) -> list[str]:
    """Containers, sockets, cgroups and processes of a runner's pool that still exist."""
    found = [f"container {name}" for name in Containers(config).existing()]
    pool_dir = config.pool_socket_dir
    if pool_dir.is_dir():
        found += [f"socket dir {p}" for p in pool_dir.iterdir()]
    if Path(config.run_dir).exists():
        found.append(f"run dir {config.run_dir}")
    prefix = config.container_prefix
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for parent in (hierarchy, *(p for p in hierarchy.glob("*") if p.is_dir())):
            found += [f"cgroup {p}" for p in parent.glob(f"lxc.*.{prefix}*")]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"lxc.payload.{prefix}" in (proc / "cgroup").read_text():
                found.append(f"process {proc.name}")
        except OSError:
            continue
    return sorted(set(found))


@pytest.fixture(scope="session")
def runner() -> Iterator[RunnerProcess]:
    config = service.runner_config(RUNNER_PORT, "stockade-t-")
    process = RunnerProcess(config)
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        left = runner_leftovers(config)
        log = process.log()
        process.close()
        assert code == 0, f"the runner stopped with {code}:\n{log}"
        assert not left, f"the runner left {left}"


@pytest.fixture(scope="session")
def nginx(runner: RunnerProcess) -> Iterator[NginxProcess]:
    proxy = NginxProcess(runner.config, NGINX_PORT)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
