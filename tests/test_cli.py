"""The command line: `exec` and `run` (exit codes, one-line errors, one JSON record) and
`nginx-config`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stockade import client
from stockade.result import OutFile
from stockade.runner.local import RunnerProcess

STOCKADE = [sys.executable, "-m", "stockade"]


def stockade(*args: str, stdin: bytes | None = b"") -> subprocess.CompletedProcess[bytes]:
    """stdin=None: no stdin at all (a terminal-less CI job), else what is piped in."""
    return subprocess.run([*STOCKADE, *args], input=stdin, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL if stdin is None else None)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text("import sys\ndata = sys.stdin.read()\nprint(data.upper())\n"
                    "sys.exit(int(data.strip() == 'fail'))\n")
    return path


def test_exec_json_prints_exactly_one_record(program: Path) -> None:
    done = stockade("exec", "--json", "--memory", "64", str(program), stdin=b"hi")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "ok" and record["stdout"] == "HI\n"
    assert done.stdout.decode().count("\n") == 1


def test_exec_passes_program_output_through(program: Path) -> None:
    done = stockade("exec", str(program), stdin=b"fail")
    assert done.returncode == 1
    assert done.stdout == b"FAIL\n"
    assert done.stderr == b"stockade: runtime_error: exited with code 1\n"


def test_exec_limit_hit_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "spin.py"
    path.write_text("while True: pass\n")
    done = stockade("exec", "--json", "--cpu-time", "0.2", str(path))
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "time_limit"


@pytest.mark.parametrize(("args", "message"), [
    (["exec", "/nonexistent.py"], "cannot read /nonexistent.py"),
    (["exec", "--memory", "999999", "PROGRAM"], "memory_mib=999999MiB is outside"),
    (["exec", "--cpu-time", "abc", "PROGRAM"], "invalid float value"),
    (["exec", "--bogus", "PROGRAM"], "unrecognized arguments"),
    (["run"], "required: FILE"),
    (["run", "--url", "ftp://127.0.0.1", "PROGRAM"], "--url: a runner's URL is http:// or"),
])
def test_usage_errors_are_one_line_exit_2(program: Path, args: list[str], message: str) -> None:
    done = stockade(*[str(program) if a == "PROGRAM" else a for a in args])
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stockade: ") and message in lines[0], lines


def test_run_talks_to_a_runner(runner: RunnerProcess, tmp_path: Path) -> None:
    url = f"--url=http://127.0.0.1:{runner.port}"
    program = tmp_path / "rev.py"
    program.write_text("print(input()[::-1])")
    given = tmp_path / "in.txt"
    given.write_text("olleh")
    answer = stockade("run", url, "--stdin", str(given), "--json", str(program))
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["stdout"] == "hello\n"
    program.write_text("while True: pass")
    spin = stockade("run", url, "--cpu-time", "0.2", str(program))
    assert spin.returncode == 1 and b"time_limit" in spin.stderr


def test_run_refusals_and_unreachable_runners_are_one_line(runner: RunnerProcess,
                                                           program: Path) -> None:
    over = stockade("run", f"--url=http://127.0.0.1:{runner.port}", "--memory", "999999",
                    str(program))
    assert over.returncode == 2
    assert over.stderr.decode().count("\n") == 1 and b"limits.memory_mib" in over.stderr
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = stockade("run", f"--url=http://127.0.0.1:{port}", str(program))
    assert gone.returncode == 3 and b"cannot reach the runner" in gone.stderr


def test_nginx_config_renders_the_site() -> None:
    site = stockade("nginx-config", "--listen", "8081", "--upstream", "127.0.0.1:9999")
    assert site.returncode == 0
    assert b"listen 8081;" in site.stdout and b"server 127.0.0.1:9999;" in site.stdout


def test_version_is_printed() -> None:
    done = stockade("--version")
    assert done.returncode == 0 and done.stdout.decode().startswith("stockade 0.")


def test_bare_stockade_prints_usage_and_commands() -> None:
    done = stockade()
    assert done.returncode == 2
    text = done.stderr.decode()
    assert text.startswith("usage: stockade")
    for command in ("exec", "serve", "run", "doctor", "images"):
        assert f"    {command} " in text, command


def test_run_takes_piped_stdin_args_and_files_and_saves_out(runner: RunnerProcess,
                                                            tmp_path: Path) -> None:
    program = tmp_path / "prog.py"
    program.write_text(
        "import os, sys\n"
        "os.makedirs('out/deep', exist_ok=True)\n"
        "text = open('data.txt').read() + sys.stdin.read()\n"
        "open('out/deep/report.txt', 'w').write(text.upper())\n"
        "open('out/blob.bin', 'wb').write(open('raw.bin', 'rb').read()[::-1])\n"
        "print(sys.argv[1:])\n")
    (tmp_path / "data.txt").write_text("from a file, ")
    (tmp_path / "bytes").write_bytes(b"\x00\xff\x01")
    saved = tmp_path / "saved"
    done = stockade("run", f"--url=http://127.0.0.1:{runner.port}",
                    "--file", str(tmp_path / "data.txt"), "-f", f"raw.bin={tmp_path / 'bytes'}",
                    "--out", str(saved), str(program), "-v", "--json", stdin=b"and a pipe")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"['-v', '--json']\n"  # after FILE, every word is the program's
    assert (saved / "deep/report.txt").read_text() == "FROM A FILE, AND A PIPE"
    assert (saved / "blob.bin").read_bytes() == b"\x01\xff\x00"
    assert b"saved " in done.stderr


def test_run_without_stdin_sends_none(runner: RunnerProcess, tmp_path: Path) -> None:
    program = tmp_path / "prog.py"
    program.write_text("import sys\nprint(repr(sys.stdin.read()))")
    done = stockade("run", f"--url=http://127.0.0.1:{runner.port}", str(program), stdin=None)
    assert done.returncode == 0 and done.stdout == b"''\n", done.stderr


def test_saved_files_never_leave_the_directory_or_follow_links(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(target)
    for name in ("../escape", "/etc/passwd", "a//b", "link/x", "link"):
        with pytest.raises((client.AnswerError, OSError)):
            client.save_files([OutFile(name=name, content="x")], out)
    with pytest.raises(client.AnswerError, match="invalid base64"):
        client.save_files([OutFile(name="x", content="!!", encoding="base64")], out)
    assert list(target.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_check_config_refuses_a_pool_that_overcommits_the_host(tmp_path: Path) -> None:
    host_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    config = tmp_path / "runner.json"
    config.write_text(json.dumps({"pool_memory_mib": host_mib}))
    done = stockade("check-config", str(config))
    assert done.returncode == 2 and done.stderr.decode().count("\n") == 1, done.stderr
    assert f"more than this host's {host_mib} MiB less the 1024 MiB reserve" in \
        done.stderr.decode()
    config.write_text(json.dumps({"memory_reserve_mib": host_mib - 1000}))
    done = stockade("check-config", str(config))
    assert done.returncode == 2 and b"less than one container's cap" in done.stderr
    config.write_text(json.dumps({"pool_memory_mib": 2048}))
    done = stockade("check-config", str(config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pool_memory_mib"] == 2048
    assert b"memory cap on this host: 2048 MiB" in done.stderr
