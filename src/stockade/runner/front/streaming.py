"""Server-sent events for a run: its output as it is written, then its result record.

A client that sends `Accept: text/event-stream` gets, once its run has a container, a `200`
stream of `stdout` and `stderr` events and one `result` event. Every event's data is JSON:
a chunk of output as a JSON string (SSE's own lines cannot carry a lone `\\r` or a final
newline faithfully), the record as an object. Refusals before the run starts (a bad key,
a bad field, a full queue) keep their status and error body, as without streaming.

The output is what the record keeps: the run's reader passes on only the bytes within the
output cap, so a stream is bounded by the same cap as the record.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import Awaitable
from typing import Any

import msgspec
from aiohttp import web

from stockade.result import Result

CONTENT_TYPE = "text/event-stream"
STREAMS = ("stdout", "stderr")
_STARTED = "started"


def wanted(request: web.Request) -> bool:
    """Whether the client asked for a stream (and not only allows one among others)."""
    return any(part.split(";")[0].strip().lower() == CONTENT_TYPE
               for part in request.headers.get("Accept", "").split(","))


def event(name: str, data: Any) -> bytes:
    """One SSE event whose data is `data` as JSON (a single line: JSON escapes newlines)."""
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


class RunEvents:
    """The bridge between a run's reading thread and the response.

    `started` and `output` may be called from any thread; `send` runs in the event loop and
    writes the events in the order the output was read, merging pieces that wait together.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Unbounded, but what enters is bounded: only output within the run's cap.
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                         for name in STREAMS}

    def started(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (_STARTED, b""))

    def output(self, stream: str, chunk: bytes) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (stream, chunk))

    def _pending(self, first: tuple[str, bytes]) -> list[bytes]:
        """`first` and whatever else is queued, as events: one per run of one stream."""
        events, name, data = [], first[0], bytearray(first[1])
        while True:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                item = None
            if item is not None and item[0] == name:
                data += item[1]
                continue
            events.append(self._text_event(name, bytes(data)))
            if item is None:
                return [e for e in events if e]
            name, data = item[0], bytearray(item[1])

    def _text_event(self, name: str, data: bytes, final: bool = False) -> bytes:
        if name not in self.decoders:
            return b""
        text = self.decoders[name].decode(data, final)
        return event(name, text) if text else b""

    async def send(self, request: web.Request, run: Awaitable[Result],
                   headers: dict[str, str]) -> web.StreamResponse:
        """Answer `request` with the events of `run`. An exception `run` raises before it
        started (a refusal) propagates, so the client gets that status instead."""
        task = asyncio.ensure_future(run)
        try:
            response = None
            while True:
                getting = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({task, getting}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    # The run ended, and everything it wrote was queued before it did.
                    getting.cancel()
                    break
                if response is None:
                    response = await self._open(request, headers)
                await self._write(response, self._pending(getting.result()))
            result = await task  # a refusal before the start raises here: no stream yet
            response = response or await self._open(request, headers)
            rest = self._pending(self.queue.get_nowait()) if not self.queue.empty() else []
            flushed = [self._text_event(name, b"", final=True) for name in STREAMS]
            await self._write(response, [*rest, *flushed, event("result", result)])
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            # A client that leaves does not stop the run (as without streaming): the task
            # ends in its own time, and its outcome is only logged.
            task.add_done_callback(_observed)

    @staticmethod
    async def _open(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx passes each event on at once
            **headers})
        await response.prepare(request)
        return response

    @staticmethod
    async def _write(response: web.StreamResponse, events: list[bytes]) -> None:
        data = b"".join(e for e in events if e)
        if data:
            with contextlib.suppress(ConnectionError):  # the client left; the run goes on
                await response.write(data)


def _observed(task: asyncio.Future[Result]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it as lost
