"""systemd readiness (Type=notify): the runner says READY=1 only once its pool is warm, so
`systemctl start` returns when runs can start; STOPPING=1 when it begins to drain."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from stockade.runner.local import runner_config
from support.runners import own_runner

PORT = 18098


def test_ready_comes_with_a_warm_pool_and_stopping_with_the_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="stockade-notify-") as directory, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        path = str(Path(directory) / "notify")
        listener.bind(path)
        listener.settimeout(120)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        config = runner_config(PORT, "stockade-y-", pool_size=1, lean_pool_size=1)
        with own_runner(config, wait=False) as runner:
            message = listener.recv(4096).decode()
            # The first word systemd hears is READY, and /readyz agrees at that moment.
            assert message.startswith("READY=1\nSTATUS=serving with 2 warm containers"), message
            assert runner.get("/readyz").status == 200
            assert runner.stop() == 0
            assert listener.recv(4096) == b"STOPPING=1"
