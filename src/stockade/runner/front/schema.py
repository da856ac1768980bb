"""The HTTP API's typed schema: native requests, Piston v2 requests and their answers.

Decoding is the validation: unknown fields, wrong types and invalid UTF-8 never reach the
pool. Every error becomes an `ApiError` with a code, a message a user can act on, and the
offending field.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

import msgspec

from stockade import protocol
from stockade.limits import LimitError, LimitPolicy, Limits
from stockade.result import Result, Status

LANGUAGE = "python"
ALIASES = ["py", "python3"]
LanguageName = Literal["python", "py", "python3"]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class FileIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


class LimitsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cpu_time_s: float | None = None
    wall_time_s: float | None = None
    memory_mib: int | None = None
    processes: int | None = None
    output_kib: int | None = None
    file_size_kib: int | None = None


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    language: LanguageName = "python"
    stdin: str = ""
    args: list[str] = []
    files: list[FileIn] = []
    limits: LimitsIn | None = None


class Language(msgspec.Struct, frozen=True):
    name: str
    version: str
    aliases: list[str]
    preloaded: list[str]


class Languages(msgspec.Struct, frozen=True):
    languages: list[Language]
    limits: LimitPolicy


# -- Piston v2 ---------------------------------------------------------------------------

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


class PistonError(msgspec.Struct, frozen=True):
    message: str


# -- decoding ----------------------------------------------------------------------------

_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?")
_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def _field_of(message: str) -> str | None:
    unknown = _UNKNOWN.match(message)
    if unknown:
        return ".".join(p for p in (unknown.group(2), unknown.group(1)) if p)
    at = _AT.search(message)
    return at.group(1) if at else None


def decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_utf8", "the body is not valid UTF-8") from None
    except msgspec.ValidationError as exc:
        field = _field_of(str(exc))
        code = "unknown_language" if field == "language" else "invalid_request"
        raise ApiError(422, code, str(exc), field) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def check_language(language: str, field: str = "language") -> None:
    if language != LANGUAGE and language not in ALIASES:
        raise ApiError(422, "unknown_language",
                       f"unknown language {language!r}; GET /v1/languages lists them", field)


def file_content(content: str, encoding: str, field: str) -> bytes:
    if encoding == "utf8":
        return content.encode("utf-8", "surrogatepass")
    try:
        if encoding == "hex":
            return bytes.fromhex(content)
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_file", f"content is not valid {encoding}", field) from None


def check_files(files: list[protocol.InputFile], args: list[str], max_files: int,
                max_file_bytes: int) -> None:
    if len(files) > max_files:
        raise ApiError(422, "too_many_files", f"at most {max_files} files", "files")
    seen = set()
    for index, item in enumerate(files):
        field = f"files[{index}].name"
        try:
            protocol.check_file_name(item.name)
        except protocol.ProtocolError as exc:
            raise ApiError(422, "invalid_file_name", str(exc), field) from None
        if item.name in seen:
            raise ApiError(422, "invalid_file_name", f"duplicate file name {item.name!r}", field)
        seen.add(item.name)
        if len(item.content) > max_file_bytes:
            raise ApiError(422, "file_too_large", f"{item.name!r} is over the "
                           f"{max_file_bytes // 1024} KiB cap", f"files[{index}].content")
    try:
        protocol.check_payload(protocol.Payload(code="", args=args))
    except protocol.ProtocolError as exc:
        raise ApiError(422, "invalid_args", str(exc), "args") from None


def resolve_limits(policy: LimitPolicy, requested: dict[str, Any]) -> Limits:
    try:
        return policy.resolve(requested)
    except LimitError as exc:
        raise ApiError(422, "limit_out_of_range", exc.message, f"limits.{exc.field}") from None


def piston_limits(request: PistonRequest) -> dict[str, Any]:
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
    return wanted


PISTON_STATUS = {
    Status.RUNTIME_ERROR: "RE", Status.SIGNALED: "SG", Status.TIME_LIMIT: "TO",
    Status.WALL_TIME_LIMIT: "TO", Status.MEMORY_LIMIT: "SG", Status.FILE_SIZE_LIMIT: "SG",
    Status.INTERNAL_ERROR: "XX",
}


def piston_run(result: Result) -> PistonRun:
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
