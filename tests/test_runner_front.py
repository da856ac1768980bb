"""The HTTP front as a service of its own (`serve --external-front` + `stockade front`, the
two systemd units): started as the runner user, it gets the configuration and the listening
socket from the root manager, each side refuses the other's impostor, and a stop drains."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.runner.local import LocalServiceError, RunnerProcess, runner_config
from stockade.runner.manager.main import ensure_user
from support.runners import own_runner

PORT = 18094
USER = "stockade"


def as_user(user: str, *argv: str, group: str | None = None) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={group or user}", "--init-groups",
            "--inh-caps=-all", "--bounding-set=-all", *argv]


def front_command(socket_path: str) -> list[str]:
    return as_user(USER, sys.executable, "-m", "stockade", "front", "--socket", socket_path)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], runner: RunnerProcess) -> None:
    deadline = time.monotonic() + 120
    while not path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LocalServiceError(f"the manager never listened at {path}:\n{runner.log()}")
        time.sleep(0.05)


@pytest.fixture(autouse=True, scope="module")
def runner_user() -> None:
    """The runner's user, as `stockade serve` makes it (the front runs as it)."""
    ensure_user(USER)


@pytest.fixture
def notify() -> Iterator[tuple[socket.socket, str]]:
    """A systemd-like notify socket the front (another user) may write to."""
    with tempfile.TemporaryDirectory(prefix="stockade-front-notify-") as directory, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        Path(directory).chmod(0o755)
        path = str(Path(directory) / "notify")
        listener.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - the front, another user, writes to it
        listener.settimeout(120)
        yield listener, path


def test_an_external_front_serves_as_the_runner_user_and_drains(
        notify: tuple[socket.socket, str]) -> None:
    listener, notify_path = notify
    config = runner_config(PORT, "stockade-f-", pool_size=1, lean_pool_size=1)
    front_socket = Path(config.run_dir) / "front.sock"
    with own_runner(config, False, "--external-front") as runner, \
            tempfile.TemporaryFile() as front_log:
        assert runner.proc is not None
        wait_for_socket(front_socket, runner.proc, runner)
        assert (front_socket.stat().st_mode & 0o777, front_socket.stat().st_gid) == \
            (0o660, pwd.getpwnam(USER).pw_gid)
        # Any other uid that reaches the socket (root here) gets no hello and no listener.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
            impostor.settimeout(30)
            impostor.connect(str(front_socket))
            assert socket.recv_fds(impostor, 65536, 4)[:2] == (b"", [])
        assert "refused a front from uid 0" in runner.log()

        front = subprocess.Popen(front_command(str(front_socket)), stdin=subprocess.DEVNULL,
                                 stdout=front_log, stderr=front_log,
                                 env=os.environ | {"NOTIFY_SOCKET": notify_path})
        try:
            assert listener.recv(4096).decode().startswith(
                f"READY=1\nSTATUS=serving on 127.0.0.1:{PORT}")
            runner.wait_ready()
            result = runner.run("import os; print(os.getuid(), 'hi')")
            assert result.status == "ok" and result.stdout.endswith(" hi\n"), result
            front_status = Path(f"/proc/{front.pid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in front_status.splitlines())
            assert fields["Uid"].split()[0] == str(pwd.getpwnam(USER).pw_uid)
            assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"].strip() == "1"
            # The manager's stop drains the front, which exits cleanly, and then itself.
            assert runner.stop() == 0
            assert front.wait(60) == 0
        finally:
            if front.poll() is None:
                front.kill()
                front.wait()
            front_log.seek(0)
            print(front_log.read().decode(errors="replace")[-3000:])
    assert not front_socket.exists()


def test_a_stop_before_any_front_comes_is_a_clean_stop() -> None:
    config = runner_config(PORT, "stockade-f-", pool_size=1, lean_pool_size=0)
    with own_runner(config, False, "--external-front") as runner:
        assert runner.proc is not None
        wait_for_socket(Path(config.run_dir) / "front.sock", runner.proc, runner)
        assert runner.stop() == 0
        assert "stopped before a front connected" in runner.log()


def test_the_front_refuses_a_socket_root_does_not_hold() -> None:
    with tempfile.TemporaryDirectory(prefix="stockade-front-fake-") as directory:
        Path(directory).chmod(0o777)
        path = Path(directory) / "front.sock"
        fake = subprocess.Popen(as_user("nobody", sys.executable, "-c", (
            "import os, socket, time\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.bind({str(path)!r}); os.chmod({str(path)!r}, 0o666); s.listen(1)\n"
            "time.sleep(60)\n"), group="nogroup"))
        try:
            deadline = time.monotonic() + 10
            while not path.is_socket() and time.monotonic() < deadline:
                time.sleep(0.05)
            tried = subprocess.run(front_command(str(path)), capture_output=True, text=True,
                                   timeout=60, check=False)
            assert tried.returncode == 2
            assert "not root: not a stockade pool manager; refusing it" in tried.stderr
        finally:
            fake.kill()
            fake.wait()


def test_the_front_will_not_run_as_root() -> None:
    tried = subprocess.run([sys.executable, "-m", "stockade", "front", "--socket",
                            "/nonexistent/front.sock"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert tried.returncode == 2 and "never as root" in tried.stderr

