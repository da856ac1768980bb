"""`stockade run`: a small client of a runner's HTTP API (standard library and msgspec).
What comes back is the runner's word, not the run's: still, a file it names is written only
below the chosen directory, and never through a link."""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from stockade.result import OutFile, Result
from stockade.wire import ErrorBody, RunRequest

TIMEOUT_S = 700.0  # past the largest wall-time cap an operator may configure
MAX_ANSWER = 256 << 20
STREAM_TYPE = "text/event-stream"
# Called with "stdout" or "stderr" and the text, as the run writes it.
OutputSink = Callable[[str, str], None]
T = TypeVar("T")


class RemoteError(RuntimeError):
    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage  # the request was refused: the caller's input is at fault


class Runner:
    """A runner at `url`, called with `key` as the API key if given."""

    def __init__(self, url: str, key: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"--url must be an http:// or https:// URL, got {url!r}",
                              usage=True)
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str,
             body: msgspec.Struct | dict[str, Any] | bytes | None, answer_type: type[T],
             sink: OutputSink | None = None) -> T:
        """One request (a body of bytes goes as it is, anything else as JSON); its JSON
        answer decoded as `answer_type` (or, with `sink`, its events: the output to the
        sink, the `result` event decoded)."""
        raw_body = isinstance(body, bytes)
        headers = {"Content-Type": "application/octet-stream" if raw_body
                   else "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if sink is not None:
            headers["Accept"] = STREAM_TYPE
        data = body if isinstance(body, bytes) or body is None else msgspec.json.encode(body)
        http_request = urllib.request.Request(  # noqa: S310 - the scheme was checked
            f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(http_request, timeout=TIMEOUT_S) as answer:  # noqa: S310
                if sink is not None and answer.headers.get_content_type() == STREAM_TYPE:
                    return _streamed(answer, sink, answer_type)
                raw = answer.read(MAX_ANSWER)
                return msgspec.json.decode(raw or b"null", type=answer_type)
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"cannot reach the runner at {self.url}: {exc}") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RemoteError(f"the runner's answer is not what {method} {path} answers: "
                              f"{exc}") from None


def run(url: str, request: RunRequest, key: str | None = None,
        sink: OutputSink | None = None) -> Result:
    """The run's result from the runner at `url`, with `key` as the API key if given; with
    `sink`, the output is streamed to it as the program writes it."""
    return Runner(url, key).call("POST", "/v1/runs", request, Result, sink)


def events(answer: HTTPResponse) -> Iterator[tuple[str, bytes]]:
    """(event, data) pairs of a server-sent event stream, at most MAX_ANSWER bytes in all."""
    name, data, total = "message", bytearray(), 0
    while total < MAX_ANSWER:
        line = answer.readline(MAX_ANSWER - total)
        if not line:
            return
        total += len(line)
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield name, bytes(data[:-1])  # the data lines, joined by newlines
            name, data = "message", bytearray()
            continue
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data += value + b"\n"
    raise RemoteError(f"the runner's stream is over {MAX_ANSWER} bytes")


def _streamed(answer: HTTPResponse, sink: OutputSink, result_type: type[T]) -> T:
    for name, data in events(answer):
        if name in ("stdout", "stderr"):
            sink(name, msgspec.json.decode(data, type=str))
        elif name == "result":
            return msgspec.json.decode(data, type=result_type)
    raise RemoteError("the runner's stream ended without a result")


def _refusal(exc: urllib.error.HTTPError) -> RemoteError:
    try:
        detail = msgspec.json.decode(exc.read(65536), type=ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError, OSError):
        return RemoteError(f"the runner answered HTTP {exc.code}")
    where = f" ({detail.field})" if detail.field else ""
    text = f"{detail.code}{where}: {detail.message}"
    return RemoteError(f"refused: {text}", usage=400 <= exc.code < 500)


def _safe_parts(name: str) -> list[str]:
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise RemoteError(f"the runner returned a file with an unsafe name: {name!r}")
    return parts


def save_files(files: list[OutFile], directory: Path) -> list[Path]:
    """Write the run's out/ files below `directory`, one directory descriptor at a time,
    refusing any name that could leave it and any link already in the way."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    for item in files:
        parts = _safe_parts(item.name)
        try:
            data = (base64.b64decode(item.content, validate=True)
                    if item.encoding == "base64" else item.content.encode())
        except ValueError:
            raise RemoteError(f"the runner returned {item.name!r} in invalid base64") from None
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
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
        saved.append(directory.joinpath(*parts))
    return saved
