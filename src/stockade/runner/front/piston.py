"""Piston v2, for existing Piston clients: its request becomes a native `RunRequest` and
takes exactly the path `POST /v1/runs` takes; the result record becomes Piston's answer.
Unknown fields are ignored, as Piston does."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec

from stockade.limits import LimitsIn
from stockade.result import Result, Status
from stockade.runner.front.environments import Catalogue
from stockade.runner.front.schema import ApiError, check_language, file_content
from stockade.wire import LANGUAGE, FileIn, RunRequest


class PistonFile(msgspec.Struct, frozen=True):
    content: str
    name: str | None = None
    encoding: Literal["utf8", "base64", "hex"] = "utf8"


class PistonRequest(msgspec.Struct, frozen=True):
    """Piston's own fields; like Piston, fields it does not know are ignored."""

    language: str
    files: list[PistonFile]
    version: str = "*"
    stdin: str = ""
    args: list[str] = []
    run_timeout: int | None = None  # ms; -1 means the default
    run_cpu_time: int | None = None  # ms
    run_memory_limit: int | None = None  # bytes
    compile_timeout: int | None = None
    compile_cpu_time: int | None = None
    compile_memory_limit: int | None = None


class PistonRun(msgspec.Struct, frozen=True):
    stdout: str
    stderr: str
    output: str
    code: int | None
    signal: str | None
    message: str | None
    status: str | None  # RE, SG, TO, OL, EL, XX; null when ok
    cpu_time: int  # ms
    wall_time: int  # ms
    memory: int  # bytes


class PistonResponse(msgspec.Struct, frozen=True):
    language: str
    version: str
    run: PistonRun


class PistonRuntime(msgspec.Struct, frozen=True):
    language: str
    version: str
    aliases: list[str]
    # Piston names a runtime where one language has several; here, the environment (a
    # request picks it by version: the first that matches, the default first).
    runtime: str | None = None


class PistonError(msgspec.Struct, frozen=True):
    message: str
    request_id: str | None = None  # beyond Piston's shape; Piston's clients ignore it



# -- translation -------------------------------------------------------------------------

def _program(request: PistonRequest) -> str:
    if not request.files:
        raise ApiError(400, "invalid_request", "files must hold at least the program", "files")
    main = request.files[0]
    try:
        return file_content(main.content, main.encoding, "files[0].content").decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_utf8", "the program is not valid UTF-8",
                       "files[0].content") from None


def _file(index: int, item: PistonFile) -> FileIn:
    """Piston's other files (names optional, hex allowed) as native ones."""
    name = item.name or f"file{index}"
    if item.encoding != "hex":
        return FileIn(name, item.content, item.encoding)
    raw = file_content(item.content, "hex", f"files[{index}].content")
    return FileIn(name, base64.b64encode(raw).decode(), "base64")


def to_run_request(request: PistonRequest, catalogue: Catalogue) -> RunRequest:
    """Piston's request as a native one, in the first environment whose Python matches
    its `version`."""
    env = catalogue.for_piston(request.language, request.version)
    check_language(request.language)
    return RunRequest(code=_program(request), environment=env.name, stdin=request.stdin,
                      args=request.args,
                      files=[_file(i, f) for i, f in enumerate(request.files[1:], start=1)],
                      limits=_limits(request))


def _limits(request: PistonRequest) -> LimitsIn:
    """Piston's units (ms, bytes; -1 or absent means default) into stockade's."""
    wanted: dict[str, Any] = {}
    for field, name, scale in (("run_timeout", "wall_time_s", 1000),
                               ("run_cpu_time", "cpu_time_s", 1000),
                               ("run_memory_limit", "memory_mib", 1 << 20)):
        value = getattr(request, field)
        if value is None or value == -1:
            continue
        if value < 0:
            raise ApiError(400, "limit_out_of_range", f"{field} must be -1 or positive", field)
        wanted[name] = value / scale if scale == 1000 else max(1, value // scale)
    return LimitsIn(**wanted)


PISTON_STATUS = {
    Status.RUNTIME_ERROR: "RE", Status.SIGNALED: "SG", Status.TIME_LIMIT: "TO",
    Status.WALL_TIME_LIMIT: "TO", Status.MEMORY_LIMIT: "SG", Status.FILE_SIZE_LIMIT: "SG",
    Status.INTERNAL_ERROR: "XX",
}


def _run(result: Result) -> PistonRun:
    if result.status == Status.OUTPUT_LIMIT:
        status: str | None = "EL" if result.stderr_truncated else "OL"
    else:
        status = PISTON_STATUS.get(Status(result.status))
    return PistonRun(
        stdout=result.stdout, stderr=result.stderr, output=result.stdout + result.stderr,
        code=result.exit_code, signal=result.signal,
        message=result.message or None, status=status,
        cpu_time=round(result.cpu_time_s * 1000), wall_time=round(result.wall_time_s * 1000),
        memory=result.memory_peak_kib * 1024)


def to_response(result: Result, python_version: str) -> PistonResponse:
    return PistonResponse(LANGUAGE, python_version, _run(result))
