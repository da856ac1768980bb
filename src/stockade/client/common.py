"""What the blocking and the asyncio clients share: each API call as a `Call` (method, path,
body, headers), reading an answer back under a size cap, the retry policy, server-sent
events, and writing a run's files below a directory.

What comes back is the runner's word, not the run's: still, it is decoded into typed records
with a cap on its size, and a file it names is written only below the chosen directory and
never through a link."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import email.utils
import os
import time
import types
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import httpx
import msgspec

from stockade.client.errors import AnswerError, ApiError, StockadeError, TransportError
from stockade.limits import LimitsIn
from stockade.result import OutFile
from stockade.wire import (
    CellRequest,
    ErrorBody,
    FileIn,
    RunRequest,
    SessionInfo,
    SessionRequest,
)

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_ENV = "STOCKADE_API_KEY"  # where `stockade run`, `stockade session` and agents keep a key
TIMEOUT_S = 700.0  # past the largest wall-time cap an operator may configure
MAX_ANSWER = 256 << 20  # bytes of one answer (or one stream) the client reads at most
MAX_TRIES = 3  # a call is sent at most this many times...
RETRY_BUDGET_S = 60.0  # ...and never retried past this long after its first try
STREAM_TYPE = "text/event-stream"
JSON_TYPE = "application/json"
RAW_TYPE = "application/octet-stream"
T = TypeVar("T")
# A run's input files: {name: content} (text as UTF-8, bytes as base64), or FileIn records.
Files = Mapping[str, str | bytes] | Sequence[FileIn] | None
Limits = LimitsIn | Mapping[str, Any] | None


# Headers that calls made in this context carry for someone else (a server calling the
# runner on its caller's behalf): their key and request id (`forwarding`).
FORWARDED: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "stockade_forwarded", default=types.MappingProxyType({}))


@contextlib.contextmanager
def forwarding(key: str | None = None, request_id: str | None = None) -> Iterator[None]:
    """Calls made within (this thread or task) carry `key` instead of the client's own,
    and `request_id` as their X-Request-Id: a service that calls the runner for its own
    callers, so the runner applies their keys and quotas and logs their ids."""
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if request_id:
        headers["X-Request-Id"] = request_id
    token = FORWARDED.set(headers)
    try:
        yield
    finally:
        FORWARDED.reset(token)


class Output(msgspec.Struct, frozen=True):
    """A chunk of a streamed run's output, as the program wrote it."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class Call:
    """One API request, as both clients send it."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = None
    idempotency_key: str | None = None
    stream: bool = False  # asks for server-sent events

    def headers(self, key: str | None) -> dict[str, str]:
        headers = {"Accept": STREAM_TYPE if self.stream else JSON_TYPE}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.content_type:
            headers["Content-Type"] = self.content_type
        if self.idempotency_key:
            headers["Idempotency-Key"] = self.idempotency_key
        headers.update(FORWARDED.get())
        return headers


def where(url: str | None, key: str | None) -> tuple[str, str | None]:
    """The runner's base URL (default $STOCKADE_URL, else a local runner's) and the key
    (default $STOCKADE_API_KEY; none for a runner that serves callers without one)."""
    url = url or os.environ.get("STOCKADE_URL", DEFAULT_URL)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a runner's URL is http:// or https://, not {url!r}")
    return url.rstrip("/"), key if key is not None else os.environ.get(KEY_ENV)


def ended_already(error: ApiError) -> bool:
    """A session's end refused because it has ended (or never was the caller's)."""
    return error.status in (404, 410)


def _json_call(method: str, path: str, body: msgspec.Struct, *, stream: bool = False,
               idempotency_key: str | None = None) -> Call:
    return Call(method, path, msgspec.json.encode(body), JSON_TYPE, idempotency_key, stream)


def _limits(limits: Limits) -> LimitsIn | None:
    if limits is None or isinstance(limits, LimitsIn):
        return limits
    try:
        return msgspec.convert(dict(limits), LimitsIn)
    except msgspec.ValidationError as exc:
        raise ValueError(f"limits: {exc}") from None


def _files(files: Files) -> list[FileIn]:
    if files is None:
        return []
    if not isinstance(files, Mapping):
        return list(files)
    return [FileIn(name, base64.b64encode(content).decode(), "base64")
            if isinstance(content, bytes) else FileIn(name, content)
            for name, content in files.items()]


def run_call(code: str, *, stdin: str, args: Sequence[str], files: Files,
             environment: str | None, limits: Limits, idempotency_key: str | None,
             stream: bool) -> Call:
    request = RunRequest(code=code, environment=environment, stdin=stdin, args=list(args),
                         files=_files(files), limits=_limits(limits))
    return _json_call("POST", "/v1/runs", request, stream=stream,
                      idempotency_key=idempotency_key)


def session_call(*, limits: Limits, idle_timeout_s: float | None, ttl_s: float | None,
                 cpu_total_s: float | None) -> Call:
    request = SessionRequest(limits=_limits(limits), idle_timeout_s=idle_timeout_s,
                             ttl_s=ttl_s, cpu_total_s=cpu_total_s)
    return _json_call("POST", "/v1/sessions", request)


def session_path(session_id: str) -> str:
    return f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}"


def cell_call(session_id: str, code: str, stdin: str, stream: bool) -> Call:
    return _json_call("POST", f"{session_path(session_id)}/runs", CellRequest(code, stdin),
                      stream=stream)


def file_path(session_id: str, name: str) -> str:
    """A session file's path: a relative name, each part quoted."""
    return f"{session_path(session_id)}/files/" + "/".join(
        urllib.parse.quote(part, safe="") for part in safe_parts(name))


def upload_call(session_id: str, name: str, content: str | bytes) -> Call:
    data = content.encode() if isinstance(content, str) else content
    return Call("PUT", file_path(session_id, name), data, RAW_TYPE)


# -- answers -------------------------------------------------------------------------------

def append_capped(into: bytearray, chunk: bytes) -> None:
    """Append one chunk of an answer to `into`, refusing an answer over MAX_ANSWER bytes."""
    into += chunk
    if len(into) > MAX_ANSWER:
        raise AnswerError(f"the runner's answer is over the client's {MAX_ANSWER >> 20} MiB cap")


def is_stream(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith(STREAM_TYPE)


def transport_error(exc: httpx.TransportError, url: str) -> TransportError:
    """No answer; `sent` unless the request cannot have reached the runner."""
    unsent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
              httpx.UnsupportedProtocol, httpx.ProxyError)
    return TransportError(f"cannot reach the runner at {url}: {exc or type(exc).__name__}",
                          sent=not isinstance(exc, unsent))


def retry_after(value: str | None) -> float | None:
    """Retry-After's seconds (a number, or an HTTP date), if it gives any."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def refusal(status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
    """The runner's refusal, in its own words where its body has them."""
    request_id = headers.get("x-request-id")
    after = retry_after(headers.get("retry-after"))
    try:
        detail = msgspec.json.decode(raw, type=ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ApiError(status, "http_error", f"the runner answered HTTP {status}",
                        request_id=request_id, retry_after=after)
    return ApiError(status, detail.code, detail.message, field=detail.field,
                    request_id=detail.request_id or request_id, retry_after=after)


def decode(raw: bytes, answer_type: type[T], call: Call) -> T:
    """An answer's body as `answer_type` (bytes: as they came; None: nothing to decode)."""
    if answer_type is bytes:
        return raw  # type: ignore[return-value]
    if answer_type is type(None):
        return None
    try:
        return msgspec.json.decode(raw, type=answer_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AnswerError(f"the runner's answer to {call.method} {call.path} is not what the "
                          f"API documents: {exc}") from None


def answer(status: int, headers: Mapping[str, str], raw: bytes, answer_type: type[T],
           call: Call) -> T:
    if status >= 400:
        raise refusal(status, headers, raw)
    return decode(raw, answer_type, call)


class Retry:
    """Whether a failed try is sent again, and after how long: at most MAX_TRIES tries
    within RETRY_BUDGET_S; a refusal only when nothing ran (429 or 503 from the runner),
    after its Retry-After; a transport failure once the request may have arrived only when
    sending it again cannot run anything twice (a GET, or an Idempotency-Key)."""

    def __init__(self, call: Call, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.call = call
        self.enabled = enabled
        self.clock = clock
        self.started = clock()
        self.tries = 1

    def delay(self, error: StockadeError) -> float | None:
        """Seconds to wait before the next try, or None: `error` is the call's answer."""
        if not self.enabled or self.tries >= MAX_TRIES:
            return None
        backoff = 0.5 * 2 ** (self.tries - 1)
        if isinstance(error, ApiError):
            if not error.before_start:
                return None
            wait = error.retry_after if error.retry_after is not None else backoff
        elif isinstance(error, TransportError):
            repeatable = self.call.method == "GET" or self.call.idempotency_key is not None
            if error.sent and not repeatable:
                return None
            wait = backoff
        else:
            return None
        if self.clock() + wait - self.started > RETRY_BUDGET_S:
            return None
        self.tries += 1
        return wait


class Events(Generic[T]):
    """A server-sent event stream, fed line by line: the output chunks as `Output`s, then
    the record of the `result` event."""

    def __init__(self, result_type: type[T]) -> None:
        self.result_type = result_type
        self.name = "message"
        self.data: list[str] = []
        self.total = 0
        self.result: T | None = None

    def feed(self, line: str) -> Output | None:
        self.total += len(line) + 1
        if self.total > MAX_ANSWER:
            raise AnswerError(f"the runner's stream is over the client's {MAX_ANSWER >> 20} "
                              "MiB cap")
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self.name = value
            elif field == "data":
                self.data.append(value)
            return None
        name, data = self.name, "\n".join(self.data)
        self.name, self.data = "message", []
        try:
            if name in ("stdout", "stderr") and data:
                return Output(name, msgspec.json.decode(data, type=str))  # type: ignore[arg-type]
            if name == "result":
                self.result = msgspec.json.decode(data, type=self.result_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AnswerError(f"the runner's {name!r} event is not what the API documents: "
                              f"{exc}") from None
        return None

    def done(self) -> T:
        if self.result is None:
            raise AnswerError("the runner's stream ended without a result")
        return self.result


def finished(result: T | None) -> T:
    """A stream's record, once it has been read to its end."""
    if result is None:
        raise StockadeError("the stream was closed before its result")
    return result


class Answered:
    """An answer being read, to either client: its response, status and headers."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response, self.url = response, url
        self.status, self.headers = response.status_code, response.headers


class SessionHandle(Generic[T]):
    """What a session is to either client: the client it calls through, and its record."""

    def __init__(self, client: T, info: SessionInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.id


# -- files ---------------------------------------------------------------------------------

def safe_parts(name: str) -> list[str]:
    """A relative file name's parts; ValueError for one that could leave its directory."""
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe file name: {name!r} (a relative path, no '.' or '..')")
    return parts


def file_bytes(item: OutFile) -> bytes:
    """An out/ file's content."""
    if item.encoding == "utf8":
        return item.content.encode()
    try:
        return base64.b64decode(item.content, validate=True)
    except ValueError:
        raise AnswerError(f"the runner returned {item.name!r} in invalid base64") from None


def save_files(files: Sequence[OutFile], directory: str | os.PathLike[str]) -> list[Path]:
    """Write a run's out/ files below `directory`, one directory descriptor at a time,
    refusing any name that could leave it and any link already in the way."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    saved = []
    for item in files:
        try:
            parts = safe_parts(item.name)
        except ValueError as exc:
            raise AnswerError(f"the runner returned a file with an {exc}") from None
        data = file_bytes(item)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                          0o644, dir_fd=fd)
            with os.fdopen(out, "wb") as handle:
                handle.write(data)
        finally:
            os.close(fd)
        saved.append(root.joinpath(*parts))
    return saved
