"""`stockade run`: a small client of a runner's HTTP API (standard library only)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import msgspec

from stockade.result import Result
from stockade.runner.schema import ErrorBody

TIMEOUT_S = 700.0  # past the largest wall-time cap an operator may configure
MAX_ANSWER = 256 << 20


class RemoteError(RuntimeError):
    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage  # the request was refused: the caller's input is at fault


def run(url: str, code: str, stdin: str, limits: dict[str, Any]) -> Result:
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--url must be an http:// or https:// URL, got {url!r}", usage=True)
    body = msgspec.json.encode({"language": "python", "code": code, "stdin": stdin,
                                "limits": limits})
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked above
        f"{url.rstrip('/')}/v1/runs", data=body, method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310
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
