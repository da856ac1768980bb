"""tools/step, which runs every long make step: it says what runs and where the log is,
speaks while it runs, and on failure shows the log's end, its path and what to run next."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

STEP = Path(__file__).resolve().parents[1] / "tools/step"


def step(log: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STEP), "doing the thing", "~2 s", str(log), "make debug", "--",
                           *command], capture_output=True, text=True, timeout=60,
                          env={**clean_environment(), **env}, check=False)


def clean_environment() -> dict[str, str]:
    """The step's own settings come from each test, never from the make that runs pytest."""
    return {k: v for k, v in os.environ.items()
            if k not in ("STEP_VERBOSE", "HEARTBEAT_S", "STEP_TAIL")}


def test_a_step_that_works_says_what_where_and_how_long(tmp_path: Path) -> None:
    done = step(tmp_path / "logs/ok.log", "sh", "-c", "echo into the log")
    assert done.returncode == 0
    assert done.stdout.startswith("==> doing the thing (~2 s); log: ")
    assert "==> done: doing the thing in" in done.stdout
    assert "into the log" not in done.stdout
    assert (tmp_path / "logs/ok.log").read_text() == "into the log\n"


def test_a_long_step_is_never_silent(tmp_path: Path) -> None:
    done = step(tmp_path / "slow.log", "sh", "-c", "echo working on it; sleep 3",
                HEARTBEAT_S="1")
    assert done.returncode == 0
    beats = [line for line in done.stdout.splitlines() if "still doing the thing" in line]
    assert len(beats) >= 2 and beats[-1].endswith("last: working on it")


def test_a_heartbeat_shows_the_log_without_terminal_colours(tmp_path: Path) -> None:
    coloured = "printf '\\033[32mok: host\\033[0m\\n'; sleep 2"
    done = step(tmp_path / "colour.log", "sh", "-c", coloured, HEARTBEAT_S="1")
    assert "last: ok: host" in done.stdout and "\x1b" not in done.stdout


def test_a_failure_shows_the_end_of_the_log_its_path_and_the_next_command(
        tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    done = step(log, "sh", "-c", "for i in $(seq 100); do echo line $i; done; exit 7",
                STEP_TAIL="5")
    assert done.returncode == 7
    assert "failed: doing the thing" in done.stderr and "(exit 7)" in done.stderr
    assert "| line 100" in done.stderr and "| line 96" in done.stderr
    assert "| line 95" not in done.stderr
    assert f"full log: {log}" in done.stderr and "next: make debug" in done.stderr


def test_verbose_streams_the_log_too(tmp_path: Path) -> None:
    done = step(tmp_path / "v.log", "sh", "-c", "echo visible", STEP_VERBOSE="1")
    assert done.returncode == 0 and "visible" in done.stdout
    assert (tmp_path / "v.log").read_text() == "visible\n"
