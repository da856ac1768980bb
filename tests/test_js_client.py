"""The TypeScript client (clients/js), built with its pinned compiler and run by Node.js's
own test runner against the live runner (its tests: clients/js/test/)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from stockade.runner.local import RunnerProcess

JS = Path(__file__).resolve().parents[1] / "clients" / "js"


def test_the_typescript_client_against_a_live_runner(runner: RunnerProcess) -> None:
    tsc = JS / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "no TypeScript compiler: `make install-test` installs it (npm ci)"
    built = subprocess.run([str(tsc), "-p", str(JS)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    done = subprocess.run(["node", "--test", "test/"], cwd=JS, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={**os.environ, "STOCKADE_URL": f"http://127.0.0.1:{runner.port}"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", done.stdout, re.MULTILINE)
    assert passed and int(passed.group(1)) >= 7 and failed and failed.group(1) == "0", \
        done.stdout[-4000:]
