"""Environments end to end: the shared runner serves each one defined, a run picks one by
name (`environment`) or by Piston's `version`, gets that release's Python and exactly its
locked packages, and an unknown one is a 422 that names the choices. Also the definitions
and locks themselves: every environment is well formed, locked by hash, and its lock was
made from its package set."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from stockade import environment
from stockade.runner.local import RunnerProcess

DATA = ["numpy", "pandas", "scipy", "matplotlib", "scikit-learn", "pyarrow"]
DATA_ENVIRONMENTS = ["python-3.11", "python-3.13"]
# What each data environment must answer through both routes: its Python, and the data
# set's heavier packages imported for real (not only found).
PROBE = """
import json, sys
import numpy, pandas, scipy, scipy.linalg, sklearn, sklearn.linear_model, pyarrow, matplotlib
model = sklearn.linear_model.LinearRegression().fit([[0], [1], [2]], [1, 3, 5])
print(json.dumps({
    "python": list(sys.version_info[:3]),
    "versions": {"numpy": numpy.__version__, "pandas": pandas.__version__,
                 "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
                 "pyarrow": pyarrow.__version__, "matplotlib": matplotlib.__version__},
    "slope": round(float(model.coef_[0]), 6),
    "det": round(float(scipy.linalg.det([[2, 0], [0, 3]])), 6),
    "arrow": pyarrow.table({"a": [1, 2, 3]}).num_rows,
}))
"""


def locked(env: str) -> dict[str, str]:
    return {pin.name: pin.version for pin in environment.get(env).pins()}


def listed(runner: RunnerProcess) -> dict[str, Any]:
    answer = runner.get("/v1/environments")
    assert answer.status == 200, answer.body
    return {env["name"]: env for env in answer.json()["environments"]}


def check_probe(env: str, stdout: str) -> None:
    seen = json.loads(stdout)
    python = environment.get(env).definition.python
    assert ".".join(map(str, seen["python"][:2])) == python
    pins = locked(env)
    assert seen["versions"] == {name: pins[name] for name in seen["versions"]}
    assert (seen["slope"], seen["det"], seen["arrow"]) == (2.0, 6.0, 3)


@pytest.mark.parametrize("env", environment.names())
def test_each_environment_is_defined_and_locked_by_hash(env: str) -> None:
    definition = environment.get(env)
    text = definition.lock_text()
    pins = environment.parse_lock(text, definition.lock_path)
    names = {name for name, _, _ in pins}
    assert len(names) == len(pins)  # one wheel each
    assert environment.INSTALLER in names
    # Made from its set and the sandbox's own requirements: each pinned as requested.
    for requirement in definition.requested():
        name, version = requirement.split("==")
        assert (name, version) in {(n, v) for n, v, _ in pins}, requirement
    if definition.definition.packages == "data":
        assert set(DATA) <= names
    else:
        assert names == {"msgspec", environment.INSTALLER}


def test_the_environments_route_lists_versions_and_packages(runner: RunnerProcess) -> None:
    answer = runner.get("/v1/environments").json()
    assert answer["default"] == "python-3.11"
    envs = {env["name"]: env for env in answer["environments"]}
    assert list(envs) == ["python-3.11", "python-3.13", "python-3.13-base"]
    for name, env in envs.items():
        definition = environment.get(name).definition
        assert env["default"] == (name == "python-3.11")
        assert re.fullmatch(rf"{re.escape(definition.python)}\.\d+", env["version"]), env
        assert {p["name"]: p["version"] for p in env["packages"]} == locked(name)
        assert env["preloaded"] == definition.preload
    # /v1/languages still describes the default environment.
    language = runner.get("/v1/languages").json()["languages"][0]
    assert language["version"] == envs["python-3.11"]["version"]


@pytest.mark.parametrize("env", DATA_ENVIRONMENTS)
def test_a_run_gets_its_environments_python_and_packages(runner: RunnerProcess,
                                                         env: str) -> None:
    result = runner.run(PROBE, environment=env, cpu_time_s=10, wall_time_s=20)
    assert result.status == "ok", result
    check_probe(env, result.stdout)


@pytest.mark.parametrize("env", DATA_ENVIRONMENTS)
def test_piston_picks_the_environment_by_version(runner: RunnerProcess, env: str) -> None:
    python = environment.get(env).definition.python
    runtimes = runner.get("/api/v2/runtimes").json()
    version = next(r["version"] for r in runtimes if r.get("runtime") == env)
    answer = runner.post("/api/v2/execute", {
        "language": "python", "version": f"{python}.x", "run_timeout": 20000,
        "run_cpu_time": 10000, "files": [{"content": PROBE}]})
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["language"], body["version"]) == ("python", version)
    assert body["run"]["code"] == 0, body
    check_probe(env, body["run"]["stdout"])


def test_the_default_environment_is_today_s(runner: RunnerProcess) -> None:
    result = runner.run("import sys, numpy, pandas; print(sys.version_info[:2])")
    assert (result.status, result.stdout) == ("ok", "(3, 11)\n")


def test_the_base_environment_has_the_standard_library_only(runner: RunnerProcess) -> None:
    result = runner.run("import sys, json, sqlite3; print(sys.version_info[:2])",
                        environment="python-3.13-base")
    assert (result.status, result.stdout) == ("ok", "(3, 13)\n")
    missing = runner.run("import numpy", environment="python-3.13-base")
    assert missing.status == "runtime_error"
    assert "ModuleNotFoundError: No module named 'numpy'" in missing.stderr


def test_an_unknown_environment_is_a_422_naming_the_choices(runner: RunnerProcess) -> None:
    answer = runner.post("/v1/runs", {"code": "print(1)", "environment": "python-2.7"})
    assert answer.status == 422
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("unknown_environment", "environment")
    assert "python-3.11, python-3.13, python-3.13-base" in error["message"]
    piston = runner.post("/api/v2/execute", {"language": "python", "version": "2.7",
                                             "files": [{"content": "print(1)"}]})
    assert piston.status == 400
    assert "runtime is unknown: this host has python 3.11." in piston.json()["message"]
