"""The front's side of the HTTP API's schema: decoding as validation, and the one step
from a decoded request to a job (the shapes both sides share are in `stockade/wire.py`).

Decoding is the validation: unknown fields, wrong types and invalid UTF-8 never reach the
pool. Every error becomes an `ApiError` with a code, a message a user can act on, and the
offending field. (Piston's shapes are in `piston.py`.)
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import msgspec

from stockade import protocol
from stockade.limits import LimitError, Limits, LimitsIn
from stockade.runner.config import RunnerConfig
from stockade.runner.front.zygote_client import Job
from stockade.wire import ALIASES, LANGUAGE, FileIn, RunRequest, SessionRequest


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds, for 429 and 503


# A client's X-Request-Id is kept if it is 1-128 of these; otherwise the front makes one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def session_terms(request: SessionRequest, config: RunnerConfig) -> tuple[float, float, float]:
    """(idle_timeout_s, ttl_s, cpu_total_s): each requested one within (0, its max]."""
    policy = config.sessions
    terms = []
    for name in ("idle_timeout_s", "ttl_s", "cpu_total_s"):
        value, cap = getattr(request, name), getattr(policy, f"max_{name}")
        if value is None:
            value = getattr(policy, name)
        elif not (math.isfinite(value) and 0 < value <= cap):
            raise ApiError(422, "out_of_range", f"{name} must be within (0, {cap}]", name)
        terms.append(float(value))
    return terms[0], terms[1], terms[2]


def session_file_name(name: str) -> str:
    try:
        protocol.check_file_name(name)
    except protocol.ProtocolError as exc:
        raise ApiError(422, "invalid_file_name", str(exc), "path") from None
    return name


# -- Piston v2 ---------------------------------------------------------------------------

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


def _files(files: list[FileIn], max_files: int, max_file_bytes: int) -> list[protocol.InputFile]:
    """Decode and check the input files: safe names that do not collide, each under the
    cap."""
    if len(files) > max_files:
        raise ApiError(422, "too_many_files", f"at most {max_files} files", "files")
    for index, item in enumerate(files):
        try:
            protocol.check_file_name(item.name)
        except protocol.ProtocolError as exc:
            raise ApiError(422, "invalid_file_name", str(exc), f"files[{index}].name") from None
    conflict = protocol.file_name_conflict([item.name for item in files])
    if conflict is not None:
        index, why = conflict
        raise ApiError(422, "invalid_file_name", why, f"files[{index}].name")
    decoded = []
    for index, item in enumerate(files):
        content = file_content(item.content, item.encoding, f"files[{index}].content")
        if len(content) > max_file_bytes:
            raise ApiError(422, "file_too_large", f"{item.name!r} is over the "
                           f"{max_file_bytes // 1024} KiB cap", f"files[{index}].content")
        decoded.append(protocol.InputFile(item.name, content))
    return decoded


def resolve_limits(config: RunnerConfig, requested: LimitsIn | None) -> Limits:
    """The limits asked for, the defaults filled in; one out of range is a 422."""
    try:
        return config.limits.resolve(requested)
    except LimitError as exc:
        raise ApiError(422, "limit_out_of_range", exc.message, f"limits.{exc.field}") from None


def to_job(request: RunRequest, config: RunnerConfig) -> tuple[Job, Limits]:
    """The one step from a decoded request to what a zygote runs: files decoded and
    checked, args checked, limits resolved against the policy."""
    files = _files(request.files, config.max_files, config.max_file_kib * 1024)
    try:
        protocol.check_args(request.args)
    except protocol.ProtocolError as exc:
        raise ApiError(422, "invalid_args", str(exc), "args") from None
    limits = resolve_limits(config, request.limits)
    return Job(code=request.code, stdin=request.stdin.encode("utf-8", "surrogatepass"),
               args=request.args, files=files), limits
