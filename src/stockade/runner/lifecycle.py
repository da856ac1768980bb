"""What both processes of the runner share about their lives: the error that stops a
start, the systemd notification, and where the manager waits for a front of its own unit.
It imports neither process's code."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from stockade.runner.config import RunnerConfig

log = logging.getLogger(__name__)
FRONT_SOCKET = "front.sock"
DEFAULT_FRONT_SOCKET = str(Path(RunnerConfig().run_dir) / FRONT_SOCKET)


class ServiceError(RuntimeError):
    """The service cannot start; the message says what to fix."""


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) how the service is: READY=1 once the pool is warm, so a
    `systemctl start` (and the rolling replacement) returns only when runs can start."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning(f"cannot notify systemd ({state!r}): {exc.strerror}")
