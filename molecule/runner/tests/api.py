"""Talking to the runner through nginx on the scenario's host, from the Molecule host."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from conftest import Instance


def post_run(instance: Instance, code: str, timeout: float = 60, **limits: Any) -> dict[str, Any]:
    body = json.dumps({"code": code, "limits": limits}).encode()
    request = urllib.request.Request(instance.url("/v1/runs"), data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            record: dict[str, Any] = json.load(answer)
            return record
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read()[:2000]!r}") from None
