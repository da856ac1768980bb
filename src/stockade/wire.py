"""The HTTP API's shapes, as both of its sides see them: the front decodes requests and
encodes answers with these, and the client (`stockade.client`) does the reverse. Pure data,
beside `result.py` and `limits.py`: nothing here is server code, and nothing imports any.
Answers tolerate fields a later runner adds (a client keeps working); requests do not (the
front refuses what it would ignore)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from stockade.limits import LimitPolicy, Limits, LimitsIn
from stockade.result import FileEntry, Result, RichOutput

LANGUAGE = "python"
ALIASES = ["py", "python3"]
LanguageName = Literal["python", "py", "python3"]


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str
    field: str | None = None
    request_id: str | None = None  # the answer's X-Request-Id: quote it to the operator


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class FileIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


EnvironmentName = Annotated[str, msgspec.Meta(max_length=64)]


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    language: LanguageName = "python"
    # Which Python and packages (GET /v1/environments); null or left out: the default.
    environment: EnvironmentName | None = None
    stdin: str = ""
    args: list[str] = []
    files: list[FileIn] = []
    limits: LimitsIn | None = None


# -- sessions ------------------------------------------------------------------------------

class SessionRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new session: its limits (memory and processes for its life; CPU time, wall time
    and output per call), and its terms (each null or left out takes the default)."""

    limits: LimitsIn | None = None
    idle_timeout_s: float | None = None
    ttl_s: float | None = None
    cpu_total_s: float | None = None


class CellRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    stdin: str = ""


class SessionInfo(msgspec.Struct, frozen=True):
    id: str
    state: Literal["idle", "running"]
    created_at: str
    expires_at: str  # at the latest: an idle session ends sooner
    idle_timeout_s: float
    ttl_s: float
    cpu_total_s: float
    limits: Limits
    calls: int
    cpu_time_s: float  # used so far
    memory_peak_kib: int


class SessionList(msgspec.Struct, frozen=True):
    sessions: list[SessionInfo]


class CellResult(Result, kw_only=True):
    """A session call's result record, with what the cell showed."""

    outputs: list[RichOutput] = msgspec.field(default_factory=list)
    outputs_truncated: bool = False
    session_ended: bool = False  # this call ended the session (a limit, or exit())


class SessionFiles(msgspec.Struct, frozen=True):
    files: list[FileEntry]
    truncated: bool = False


# -- what a runner serves -------------------------------------------------------------------

class Package(msgspec.Struct, frozen=True):
    name: str
    version: str


class EnvironmentInfo(msgspec.Struct, frozen=True):
    """An environment the manager serves, as `GET /v1/environments` shows it: its
    interpreter, as its image has it, and every package a run may import beyond the
    standard library (all locked by hash)."""

    name: str
    language: str
    version: str  # the interpreter's full version
    description: str
    default: bool
    packages: list[Package]
    preloaded: list[str]  # imported before each fork, so free to import in a run


class Language(msgspec.Struct, frozen=True):
    name: str
    version: str
    aliases: list[str]
    preloaded: list[str]


class Languages(msgspec.Struct, frozen=True):
    languages: list[Language]
    limits: LimitPolicy


class Environments(msgspec.Struct, frozen=True):
    default: str
    environments: list[EnvironmentInfo]
