"""Unit tests of the runner's own logic: routing, config checks, error fields, Piston's
units, metrics text, the nginx site, the AppArmor profile choice."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stockade import wire
from stockade.limits import LimitsIn
from stockade.result import Result, Status
from stockade.runner.channel import PoolStats
from stockade.runner.config import FULL, LEAN, EnvironmentPools, RunnerConfig, kind_for
from stockade.runner.front import nginx, piston, schema
from stockade.runner.front.environments import Catalogue
from stockade.runner.front.metrics import Metrics
from stockade.runner.front.pool_client import Lease, connect_trusted
from stockade.runner.front.runs import retire_reason
from stockade.runner.manager.apparmor import PROFILE as APPARMOR_PROFILE
from stockade.runner.manager.containers import ContainerError, apparmor_profile
from stockade.wire import EnvironmentInfo


def _info(name: str, version: str, default: bool = False) -> EnvironmentInfo:
    return EnvironmentInfo(name=name, language="python", version=version,
                                  description="", default=default, packages=[], preloaded=[])


CATALOGUE = Catalogue([_info("python-3.11", "3.11.2", default=True),
                       _info("python-3.13", "3.13.5"), _info("python-3.13-base", "3.13.5")])


@pytest.mark.parametrize(("sources", "kind"), [
    (["print(1)"], LEAN),
    (["import pandas as pd"], FULL),
    (["from numpy import array"], FULL),
    (["x = 1", "import numpy.linalg"], FULL),
    (["pandasx = 1  # not a module name"], LEAN),
])
def test_runs_go_to_the_pool_that_preloads_what_they_name(sources: list[str],
                                                         kind: str) -> None:
    config = RunnerConfig(pool_size=1, lean_pool_size=1)
    assert kind_for(config, "python-3.11", sources) == kind
    assert kind_for(config, "python-3.13", sources) == f"python-3.13-{kind}"


def test_without_a_lean_pool_everything_goes_to_the_full_one() -> None:
    assert kind_for(RunnerConfig(pool_size=1, lean_pool_size=0), "python-3.11",
                    ["print(1)"]) == FULL
    # An environment with nothing to preload has one pool, whatever a run names.
    assert kind_for(RunnerConfig(), "python-3.13-base", ["import numpy"]) == \
        "python-3.13-base-full"


@pytest.mark.parametrize(("bad", "message"), [
    ({"pool_size": 0}, "pool_size must be positive"),
    ({"queue_limit": -1}, "queue_limit must be 0 or more"),
    ({"port": 70000}, "port must be below"),
    ({"lean_pool_size": -1}, "lean_pool_size and queue_limit must be 0 or more"),
    ({"idmap_size": 1000}, "idmap_size must be at least"),
    ({"idmap_ranges": 4}, "idmap_ranges must exceed the containers"),
    ({"idmap_base": 1 << 30, "idmap_ranges": 40000}, "at most 4096"),
    ({"idmap_base": (1 << 31) - 65536}, r"must stay below 2\^31"),
    ({"pool_size": 1000}, "pool sizes are capped"),
    ({"default_environment": "cobol"}, "no environment 'cobol'; defined: python-3.11, "),
    ({"environments": {"python-2.7": EnvironmentPools()}}, "no environment 'python-2.7'"),
    ({"environments": {"python-3.11": EnvironmentPools()}}, "names the default environment"),
])
def test_config_refuses_what_cannot_work(bad: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunnerConfig(**bad)  # type: ignore[arg-type]


def test_config_refuses_unknown_keys() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `pool`"):
        msgspec.json.decode(b'{"pool": 3}', type=RunnerConfig)


@pytest.mark.parametrize(("body", "field"), [
    (b'{"code": 1}', "code"),
    (b'{"code": "", "nope": 1}', "nope"),
    (b'{"code": "", "limits": {"gpus": 1}}', "limits.gpus"),
    (b'{"code": "", "files": [{"name": "a", "content": 3}]}', "files[0].content"),
])
def test_validation_errors_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(schema.ApiError) as caught:
        schema.decode(body, wire.RunRequest)
    assert (caught.value.status, caught.value.field) == (422, field)


def test_a_piston_request_becomes_a_native_one() -> None:
    request = piston.PistonRequest(
        language="py", version="3", stdin="in", args=["-v"], run_timeout=2500,
        run_cpu_time=-1, run_memory_limit=64 << 20,
        files=[piston.PistonFile("print(1)"), piston.PistonFile("ff00", encoding="hex"),
               piston.PistonFile("x", name="data.txt")])
    native = piston.to_run_request(request, CATALOGUE)
    assert native == wire.RunRequest(
        code="print(1)", environment="python-3.11", stdin="in", args=["-v"],
        files=[wire.FileIn("file1", "/wA=", "base64"), wire.FileIn("data.txt", "x")],
        limits=LimitsIn(wall_time_s=2.5, memory_mib=64))


@pytest.mark.parametrize(("changes", "words"), [
    ({"version": "2.7"}, "runtime is unknown: this host has python 3.11.2, 3.13.5"),
    ({"version": "3.12.x"}, "runtime is unknown"), ({"version": "~3.13"}, "runtime is unknown"),
    ({"files": []}, "at least the program"),
    ({"language": "ruby"}, "unknown language"), ({"run_timeout": -5}, "-1 or positive")])
def test_piston_requests_refused_before_any_run(changes: dict[str, Any], words: str) -> None:
    fields: dict[str, Any] = {"language": "python", "files": [piston.PistonFile("")],
                              **changes}
    with pytest.raises(schema.ApiError, match=words):
        piston.to_run_request(piston.PistonRequest(**fields), CATALOGUE)


@pytest.mark.parametrize(("version", "environment"), [
    ("*", "python-3.11"), ("3", "python-3.11"), ("3.11", "python-3.11"),
    ("3.11.2", "python-3.11"), ("3.13.x", "python-3.13"), ("3.13", "python-3.13"),
    ("3.13.5", "python-3.13"), ("3.X.5", "python-3.13"), ("3.13.*", "python-3.13"),
])
def test_piston_versions_pick_the_first_environment_that_matches(version: str,
                                                                 environment: str) -> None:
    request = piston.PistonRequest(language="python", version=version,
                                   files=[piston.PistonFile("print(1)")])
    assert piston.to_run_request(request, CATALOGUE).environment == environment


def test_an_unknown_environment_is_a_422_that_names_the_choices() -> None:
    assert CATALOGUE.choose(None).name == "python-3.11"
    assert CATALOGUE.choose("python-3.13-base").version == "3.13.5"
    with pytest.raises(schema.ApiError) as caught:
        CATALOGUE.choose("python-2.7")
    error = caught.value
    assert (error.status, error.code, error.field) == (422, "unknown_environment",
                                                       "environment")
    assert "python-3.11, python-3.13, python-3.13-base" in error.message


def test_metrics_histogram_is_cumulative_and_labelled() -> None:
    metrics = Metrics("3.11.2")
    for seconds in (0.004, 0.02, 3.0):
        metrics.observe_run("alice", "ok", "lean", seconds)
    metrics.pool.stats = PoolStats(id=1, size=4, starting=0, warm=True, recycled=2,
                                   create_failures=0, failing=False, last_recycle_s=0.5)
    text = metrics.render().decode()
    assert 'stockade_run_seconds_bucket{le="0.005"} 1.0' in text
    assert 'stockade_run_seconds_bucket{le="0.025"} 2.0' in text
    assert 'stockade_run_seconds_bucket{le="+Inf"} 3.0' in text
    assert 'stockade_runs_total{key="alice",kind="lean",status="ok"} 3.0' in text
    assert "stockade_pool_size 4.0" in text and "stockade_pool_recycled_total 2.0" in text
    assert 'stockade_build_info{python="3.11.2",version="' in text
    assert "stockade_front_process_resident_memory_bytes" in text
    assert "_created" not in text
    # Every metric says what it is.
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    assert families <= helped


@pytest.mark.parametrize(("containers", "timeout", "limit", "expected"), [
    (4, 10.0, 0, 400),   # what the pool can start within the wait, at 10 runs/container-s
    (1, 1.0, 0, 16),     # never fewer than 16
    (256, 600.0, 0, 4096),  # never more than 4096
    (4, 10.0, 7, 7),     # a configured size is kept
])
def test_the_wait_queue_is_sized_from_the_pool(containers: int, timeout: float, limit: int,
                                               expected: int) -> None:
    config = RunnerConfig(pool_size=containers, lean_pool_size=0, queue_timeout_s=timeout,
                          queue_limit=limit, environments={})
    assert config.wait_queue == expected


def test_nginx_site_has_the_timeouts_and_the_runners_body_cap() -> None:
    site = nginx.render(RunnerConfig(max_body_kib=2048), listen="127.0.0.1:80")
    for directive in ("client_header_timeout 10s;", "client_body_timeout 10s;",
                      "send_timeout 10s;", "client_max_body_size 2048k;",
                      "listen 127.0.0.1:80;", "limit_conn stockade_per_client"):
        assert directive in site, directive


def test_no_apparmor_profile_where_the_kernel_has_no_apparmor(tmp_path: Path) -> None:
    assert apparmor_profile(tmp_path / "absent", tmp_path / "profiles") is None
    (tmp_path / "enabled").write_text("N\n")
    assert apparmor_profile(tmp_path / "enabled", tmp_path / "profiles") is None


def test_stockade_s_profile_where_apparmor_enforces_and_it_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "enabled").write_text("Y\n")
    (tmp_path / "profiles").write_text("lxc-container-default-cgns (enforce)\n"
                                       f"{APPARMOR_PROFILE} (enforce)\n")
    assert apparmor_profile(tmp_path / "enabled", tmp_path / "profiles") == APPARMOR_PROFILE


def test_start_is_refused_where_apparmor_enforces_without_the_profile(tmp_path: Path) -> None:
    """LXC would start containers whose runs all fail: say so at start, and how to fix it."""
    (tmp_path / "enabled").write_text("Y\n")
    (tmp_path / "profiles").write_text("lxc-container-default-cgns (enforce)\n")
    with pytest.raises(ContainerError,
                       match=r"apparmor_parser -r /etc/apparmor\.d/stockade-sandbox"):
        apparmor_profile(tmp_path / "enabled", tmp_path / "profiles")


@pytest.fixture
def zygote_socket(tmp_path: Path) -> Iterator[Path]:
    """A listening SOCK_SEQPACKET socket owned by root, as a container's zygote serves."""
    path = tmp_path / "zygote.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(4)
        yield path


def test_the_front_connects_to_a_socket_owned_and_served_by_the_container_root(
        zygote_socket: Path) -> None:
    connect_trusted(str(zygote_socket), owner_uid=0).close()


def test_the_front_refuses_a_socket_of_another_owner(zygote_socket: Path) -> None:
    with pytest.raises(PermissionError, match="not a socket owned by uid 100000"):
        connect_trusted(str(zygote_socket), owner_uid=100000)


def test_the_front_never_follows_a_planted_link(zygote_socket: Path, tmp_path: Path) -> None:
    planted = tmp_path / "box"
    planted.mkdir()
    (planted / "zygote.sock").symlink_to(zygote_socket)
    with pytest.raises(PermissionError, match="not a socket"):
        connect_trusted(str(planted / "zygote.sock"), owner_uid=0)
    (tmp_path / "linked-dir").symlink_to(zygote_socket.parent)
    with pytest.raises(OSError):  # the directory itself is opened without following links
        connect_trusted(str(tmp_path / "linked-dir" / "zygote.sock"), owner_uid=0)


def test_the_front_refuses_a_socket_served_by_another_uid(tmp_path: Path) -> None:
    """The peer's credentials are checked too: a socket chowned to the expected uid but
    served by another process is refused."""
    path = tmp_path / "zygote.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(4)
        os.chown(path, 12345, 12345)
        with pytest.raises(PermissionError, match="served by uid 0, not 12345"):
            connect_trusted(str(path), owner_uid=12345)


@pytest.mark.parametrize(("status", "runs", "age_s", "reason"), [
    ("ok", 1, 0, None),
    ("runtime_error", 1, 0, None),
    ("time_limit", 1, 0, None),
    ("memory_limit", 1, 0, None),
    ("signaled", 1, 0, "signaled"),
    ("internal_error", 1, 0, "internal_error"),
    ("ok", 5, 0, "runs"),
    ("runtime_error", 2, 61, "age"),
])
def test_a_container_retires_on_evidence_or_age_never_for_a_failed_program(
        status: str, runs: int, age_s: float, reason: str | None) -> None:
    config = RunnerConfig(pool_size=1, lean_pool_size=0, recycle_after_runs=5,
                          recycle_after_s=60)
    lease = Lease("c", FULL, "/nowhere", 100000, connection=socket.socket(socket.AF_UNIX),
                  runs=runs, since=time.monotonic() - age_s)
    try:
        assert retire_reason(config, lease, Result(status=Status(status))) == reason
        assert retire_reason(config, lease, None) == "internal_error"  # no result at all
    finally:
        lease.close()
