"""`stockade run`: a small client of a runner's HTTP API (standard library and msgspec).
What comes back is the runner's word, not the run's: still, a file it names is written only
below the chosen directory, and never through a link."""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from stockade.result import OutFile, Result
from stockade.runner.front.schema import ErrorBody, RunRequest

TIMEOUT_S = 700.0  # past the largest wall-time cap an operator may configure
MAX_ANSWER = 256 << 20


class RemoteError(RuntimeError):
    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage  # the request was refused: the caller's input is at fault


def run(url: str, request: RunRequest, key: str | None = None) -> Result:
    """The run's result from the runner at `url`, with `key` as the API key if given."""
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--url must be an http:// or https:// URL, got {url!r}", usage=True)
    body = msgspec.json.encode(request)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    http_request = urllib.request.Request(  # noqa: S310 - the scheme was checked above
        f"{url.rstrip('/')}/v1/runs", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(http_request, timeout=TIMEOUT_S) as answer:  # noqa: S310
            return msgspec.json.decode(answer.read(MAX_ANSWER), type=Result)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise RemoteError(f"cannot reach the runner at {url}: {exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteError(f"the runner's answer is not a result record: {exc}") from None


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
