"""The runner's log: one JSON object per line on stderr (journald keeps it under the unit),
so a run or a container's life can be found by request id, key or container name.

An event is a message plus typed fields: `event(log, "run", request_id=..., status=...)`.
Nothing a run wrote is logged, only what the runner measured about it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

# Anything a field holds that JSON has no type for is written as its str().
ENCODER = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "message"),
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return ENCODER.encode(line).decode()


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def event(log: logging.Logger, name: str, message: str = "", *, level: int = logging.INFO,
          **fields: Any) -> None:
    """One structured line: `name` is its kind ("run", "container_recycled", ...)."""
    log.log(level, message or name, extra={"event": name, "fields": fields})
