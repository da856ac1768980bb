"""Start a zygote as a child process with a scrubbed environment, and stop it cleanly."""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
from types import TracebackType

import msgspec

from stockade.runner.front import zygote_client as client
from stockade.sandbox.config import SandboxConfig

# The zygote's whole environment: whatever the caller holds (tokens, keys) stays out.
ZYGOTE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
DEFAULT_COMMAND = (sys.executable, "-I", "-m", "stockade.sandbox.zygote")


class ZygoteError(RuntimeError):
    """The zygote did not start or stopped unexpectedly."""


class ZygoteProcess:
    def __init__(self, config: SandboxConfig, command: tuple[str, ...] = DEFAULT_COMMAND,
                 ready_timeout_s: float = 120.0) -> None:
        self.config = config
        self.command = command
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ZygoteProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        argv = [*self.command, "--config-json", msgspec.json.encode(self.config).decode()]
        self.proc = subprocess.Popen(argv, env=ZYGOTE_ENV, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline() if sel.select(self.ready_timeout_s) else b""
        if line != b"ready\n":
            code = self.stop()
            raise ZygoteError(f"the zygote did not start (exit status {code}); "
                              "its stderr says why")

    def connect(self) -> socket.socket:
        return client.connect(self.config.socket_path)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode
