"""A real zygote for the tests, with one connection to it: `make_config` gives each one its
own unprivileged uid and a generous limit policy."""

from __future__ import annotations

import itertools
import socket
from typing import Any

from stockade.launcher import DEFAULT_COMMAND, ZygoteProcess
from stockade.limits import LimitPolicy, Limits, LimitsIn
from stockade.result import Result
from stockade.runner.front import zygote_client as client
from stockade.sandbox.config import SandboxConfig

_uids = itertools.count(61100)


def make_config(state: str, name: str, **overrides: Any) -> SandboxConfig:
    uid = next(_uids)
    values: dict[str, Any] = {
        "socket_path": f"{state}/zygote.sock", "state_dir": state, "name": name,
        "run_uid": uid, "run_gid": uid, "preload": ["json"],
        "limits": LimitPolicy(maximum=Limits(cpu_time_s=10, wall_time_s=20, memory_mib=1024,
                                             processes=64, output_kib=1024,
                                             file_size_kib=65536)),
    }
    values.update(overrides)
    return SandboxConfig(**values)


class Sandbox:
    """A running zygote and one connection to it."""

    def __init__(self, config: SandboxConfig, command: tuple[str, ...] = DEFAULT_COMMAND):
        self.config = config
        self.process = ZygoteProcess(config, command=command)
        self.process.start()
        self.sock: socket.socket = self.process.connect()

    def run(self, code: str, stdin: bytes = b"", args: list[str] | None = None,
            files: list[client.protocol.InputFile] | None = None, **limits: Any) -> Result:
        resolved = self.config.limits.resolve(LimitsIn(**limits))
        job = client.Job(code=code, stdin=stdin, args=args or [], files=files or [])
        return client.run(self.sock, job, resolved)

    def close(self) -> None:
        self.sock.close()
        self.process.stop()
