"""The environments' sandbox images came from the archives the sandbox_images role put on
the host, imported by the runner at start: nothing was built or downloaded there; and every
environment the host serves answers, with its own Python and packages, through nginx on
both routes."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import testinfra.host

from api import post_run
from conftest import Caller

# Each data environment's heavier packages imported, and its Python: one run each (its own
# CPU budget), on the full zygote (numpy and pandas named). (pytest's test_environments.py
# also uses them: a fitted model, an arrow table.)
PROBE = """
import json, sys, numpy, pandas, {module}
print(json.dumps([sys.version.split()[0], {module}.__version__]))
"""
MODULES = {"scipy": "scipy", "scikit-learn": "sklearn", "pyarrow": "pyarrow"}
LIMITS = {"wall_time_s": 20, "cpu_time_s": 10, "memory_mib": 512}


def get(caller: Caller, path: str) -> Any:
    with urllib.request.urlopen(caller.request(path), timeout=30) as answer:
        return json.load(answer)


def test_runner_imported_the_archived_images(host: testinfra.host.Host) -> None:
    archives = host.check_output("ls /var/lib/stockade/images").split()
    assert len(archives) >= 2 and all(a.startswith("stockade-sandbox-") for a in archives)
    journal = host.check_output("journalctl --unit stockade-runner --no-pager --output cat")
    for archive in archives:
        image = archive.removesuffix(".tar.gz")
        stamp = json.loads(host.file(
            f"/var/lib/stockade/containers/{image}/stockade-image.json").content_string)
        assert image.endswith(stamp["digest"][:12])
        assert image == f"stockade-sandbox-{stamp['environment']}-{stamp['digest'][:12]}"
        assert f"image from /var/lib/stockade/images/{archive}" in journal
    assert "creating the sandbox rootfs" not in journal  # never built here


def test_archive_is_readable_by_root_only(host: testinfra.host.Host) -> None:
    directory = host.file("/var/lib/stockade/images")
    assert directory.user == "root" and directory.mode == 0o700


def served(caller: Caller) -> list[dict[str, Any]]:
    listing = get(caller, "/v1/environments")
    assert listing["default"] == "python-3.11"
    return list(listing["environments"])


def test_each_image_s_environment_is_served(host: testinfra.host.Host,
                                            caller: Caller) -> None:
    """Every image on the host is current and in use, and its environment served."""
    images = json.loads(host.check_output(
        "/opt/stockade/venv/bin/stockade images list --json"))
    assert len(images) >= 2 and all(i["current"] and i["in_use"] for i in images), images
    assert {env["name"] for env in served(caller)} == {i["environment"] for i in images}


def test_every_environment_answers_with_its_python(caller: Caller) -> None:
    for env in served(caller):
        record = post_run(caller, "import sys; print(sys.version.split()[0])",
                          environment=env["name"])
        assert (record["status"], record["stdout"]) == ("ok", env["version"] + "\n"), env


@pytest.mark.parametrize("package", list(MODULES))
@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_data_package_imports_in_each_python_on_both_routes(caller: Caller, python: str,
                                                            package: str) -> None:
    envs = [e for e in served(caller)
            if e["version"].startswith(python + ".") and
            set(MODULES) <= {p["name"] for p in e["packages"]}]
    assert envs, f"no environment with Python {python} and the data set is served"
    env = envs[0]
    locked = {p["name"]: p["version"] for p in env["packages"]}
    code = PROBE.format(module=MODULES[package])
    expected = [env["version"], locked[package]]
    record = post_run(caller, code, environment=env["name"], **LIMITS)
    assert record["status"] == "ok", record
    assert json.loads(record["stdout"]) == expected
    request = caller.request("/api/v2/execute", {
        "language": "python", "version": f"{python}.x", "run_timeout": 20000,
        "run_cpu_time": 10000, "run_memory_limit": 512 << 20, "files": [{"content": code}]})
    with urllib.request.urlopen(request, timeout=60) as answer:
        piston = json.load(answer)
    assert piston["version"] == env["version"] and piston["run"]["code"] == 0, piston
    assert json.loads(piston["run"]["stdout"]) == expected
