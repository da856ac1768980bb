"""The result record every interface returns, and the one place a run's status is decided."""

from __future__ import annotations

import enum
import signal
from typing import Literal

import msgspec

from stockade.limits import Limits


class Status(enum.StrEnum):
    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    SIGNALED = "signaled"
    TIME_LIMIT = "time_limit"
    WALL_TIME_LIMIT = "wall_time_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    INTERNAL_ERROR = "internal_error"


class KillReason(enum.StrEnum):
    """Why the zygote killed a run before it ended by itself."""

    CPU_TIME = "cpu_time"
    WALL_TIME = "wall_time"
    OUTPUT = "output"
    CANCELLED = "cancelled"


class OutFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file the program left under out/: UTF-8 text as is, anything else in base64."""

    name: str
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


class RichOutput(msgspec.Struct, frozen=True):
    """A value shown by a session's cell: its repr, a table's HTML, a figure's PNG. (Records
    read by clients tolerate fields a later runner adds.)"""

    mime: Literal["text/plain", "text/html", "image/png"]
    data: str
    encoding: Literal["utf8", "base64"] = "utf8"


class FileEntry(msgspec.Struct, frozen=True):
    """A file in a session's working directory."""

    name: str
    size: int


class Result(msgspec.Struct, kw_only=True):
    status: Status
    exit_code: int | None = None
    signal: str | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time_s: float = 0.0
    wall_time_s: float = 0.0
    memory_peak_kib: int = 0
    message: str = ""
    files: list[OutFile] = []
    files_truncated: bool = False


class Outcome(msgspec.Struct, kw_only=True):
    """What the sandbox observed about a run, before it is judged against the limits."""

    exit_code: int | None = None
    signal: int | None = None
    cpu_time_s: float = 0.0
    wall_time_s: float = 0.0
    memory_peak_kib: int = 0
    oom_killed: bool = False
    killed_for: KillReason | None = None
    error: str | None = None  # stockade's own failure, never the program's


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def judge(outcome: Outcome, limits: Limits, output_over: bool) -> tuple[Status, str]:
    """Decide the status. A limit the run hit outranks how the run happened to die."""
    sig = outcome.signal
    if outcome.error is not None:
        return Status.INTERNAL_ERROR, outcome.error
    if outcome.oom_killed:
        return Status.MEMORY_LIMIT, f"memory limit of {limits.memory_mib} MiB exceeded"
    if (outcome.killed_for == KillReason.CPU_TIME or sig == signal.SIGXCPU
            or outcome.cpu_time_s > limits.cpu_time_s):
        return Status.TIME_LIMIT, f"CPU time limit of {limits.cpu_time_s:g} s exceeded"
    if outcome.killed_for == KillReason.WALL_TIME:
        return Status.WALL_TIME_LIMIT, f"wall time limit of {limits.wall_time_s:g} s exceeded"
    if output_over or outcome.killed_for == KillReason.OUTPUT:
        return Status.OUTPUT_LIMIT, f"output limit of {limits.output_kib} KiB per stream exceeded"
    if sig == signal.SIGXFSZ:
        return Status.FILE_SIZE_LIMIT, f"file size limit of {limits.file_size_kib} KiB exceeded"
    if outcome.killed_for == KillReason.CANCELLED:
        return Status.SIGNALED, "run cancelled by the caller"
    if sig is not None:
        return Status.SIGNALED, f"killed by {signal_name(sig)}"
    if outcome.exit_code != 0:
        return Status.RUNTIME_ERROR, f"exited with code {outcome.exit_code}"
    return Status.OK, ""
