"""Runs through nginx on the scenario's host, from the Molecule host."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from conftest import Caller


def post_run(caller: Caller, code: str, timeout: float = 60, environment: str | None = None,
             **limits: Any) -> dict[str, Any]:
    request = caller.request("/v1/runs", {"code": code, "limits": limits,
                                          "environment": environment})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            record: dict[str, Any] = json.load(answer)
            return record
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read()[:2000]!r}") from None
