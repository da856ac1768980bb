"""Fixtures: real zygotes (normal and, for the layer tests, weakened) on this host."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from stockade.result import Result
from stockade.runner import local
from stockade.runner.config import EnvironmentPools, SessionPolicy
from stockade.runner.local import Client, NginxProcess, RunnerProcess
from stockade.sandbox.cgroups import CgroupDriver
from stockade.sandbox.config import SandboxConfig
from support.battery import Context, host_context
from support.leftovers import runner_leftovers
from support.sandbox import Sandbox, make_config

TESTS = Path(__file__).parent
WEAK_ZYGOTE = str(TESTS / "support" / "weak_zygote.py")

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The zygotes this session started on the host share one parent cgroup (SandboxConfig's
    default cgroup_parent): once the last is gone it is empty, and goes too."""
    parent = next(f.default for f in msgspec.structs.fields(SandboxConfig)
                  if f.name == "cgroup_parent")
    for root in dict.fromkeys(CgroupDriver(parent).roots.values()):
        with contextlib.suppress(OSError):
            root.rmdir()


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


# The shared runner serves every environment besides the default, each with a container.
OTHER_ENVIRONMENTS = {"python-3.13": EnvironmentPools(pool_size=1, lean_pool_size=0),
                      "python-3.13-base": EnvironmentPools(pool_size=1, lean_pool_size=0)}


@pytest.fixture(scope="session")
def runner() -> Iterator[RunnerProcess]:
    config = local.runner_config(RUNNER_PORT, "stockade-t-",
                                 sessions=SessionPolicy(pool_size=2, idle_timeout_s=120),
                                 environments=OTHER_ENVIRONMENTS)
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


@pytest.fixture(params=["direct", "nginx"])
def api(request: pytest.FixtureRequest, runner: RunnerProcess) -> Client:
    """Both ways in: straight to the runner, and through nginx."""
    if request.param == "nginx":
        proxy: NginxProcess = request.getfixturevalue("nginx")
        return proxy
    return runner
