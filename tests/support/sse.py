"""Reading a runner's server-sent events as a client would: sseclient-py over urllib3,
each event timed as it arrives."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import sseclient
import urllib3

from stockade.runner.front import streaming
from stockade.runner.local import Client


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    events: list[tuple[float, str, Any]] = field(default_factory=list)  # (when, name, data)
    body: bytes = b""

    def text(self, name: str) -> str:
        return "".join(data for _, event, data in self.events if event == name)

    @property
    def result(self) -> dict[str, Any]:
        results = [data for _, name, data in self.events if name == "result"]
        assert len(results) == 1 and self.events[-1][1] == "result", self.events
        record: dict[str, Any] = results[0]
        return record

    def first(self, name: str) -> float:
        return next(when for when, event, _ in self.events if event == name)


def stream(client: Client, payload: dict[str, Any], path: str = "/v1/runs",
           **headers: str) -> Stream:
    """POST a run asking for events; read them as they come with sseclient-py."""
    http = urllib3.PoolManager()
    started = time.monotonic()
    answer = http.request(
        "POST", f"http://127.0.0.1:{client.port}{path}", body=json.dumps(payload),
        headers={"Content-Type": "application/json", "Accept": streaming.CONTENT_TYPE,
                 **headers}, preload_content=False, timeout=60)
    got = Stream(answer.status, dict(answer.headers))
    try:
        if answer.headers.get("Content-Type", "").startswith(streaming.CONTENT_TYPE):
            for event in sseclient.SSEClient(answer.stream(None)).events():
                got.events.append((time.monotonic() - started, event.event,
                                   json.loads(event.data)))
        else:
            got.body = answer.read()
    finally:
        answer.release_conn()
    return got
