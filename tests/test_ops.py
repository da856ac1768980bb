"""What operators get under ops/: alert rules that promtool accepts and whose own tests pass,
and a dashboard and rules that name only metrics a real runner exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stockade.runner.local import RunnerProcess

OPS = Path(__file__).resolve().parents[1] / "ops"
RULES = OPS / "prometheus" / "stockade-rules.yml"
DASHBOARD = OPS / "grafana" / "stockade-dashboard.json"
METRIC = re.compile(r"\b(stockade_[a-z_]+)\b")


def promtool(*argv: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make test-packages` installs Debian's prometheus")
    return subprocess.run(["promtool", *argv], capture_output=True, text=True, check=False,
                          cwd=RULES.parent)


def test_the_alert_rules_are_valid() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alert_rules_fire_when_they_should() -> None:
    tested = promtool("test", "rules", "stockade-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def named_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    return set(METRIC.findall("\n".join(exprs))) | set(METRIC.findall(RULES.read_text()))


def test_the_dashboard_and_rules_name_only_exported_metrics(runner: RunnerProcess) -> None:
    exported = {line.split("{")[0].split()[0]
                for line in runner.get("/metrics").body.decode().splitlines()
                if line and not line.startswith("#")}
    named = named_metrics()
    assert len(named) >= 15, named
    assert named <= exported, sorted(named - exported)
