"""The asyncio client: `AsyncClient`, `AsyncSession` and `AsyncRunStream`, the same surface
as the blocking client's (`sync.py`), awaited.

    async with AsyncClient("http://127.0.0.1:8080") as runner:
        async with runner.stream("print(1)") as stream:
            async for output in stream:
                print(output.stream, output.text)
        print((await stream.result()).status)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import httpx

from stockade.client import common
from stockade.client.common import Call, Events, Files, Limits, Output, Retry
from stockade.client.errors import ApiError, StockadeError
from stockade.result import FileEntry, Result
from stockade.wire import (
    CellResult,
    Environments,
    Languages,
    SessionFiles,
    SessionInfo,
    SessionList,
)

T = TypeVar("T")


class AsyncClient:
    """A runner at `url`, called with `key`: as `Client`, for an event loop."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout_s: float = common.TIMEOUT_S, retries: bool = True) -> None:
        self.url, self.key = common.where(url, key)
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def run(self, code: str, *, stdin: str = "", args: Sequence[str] = (),
                  files: Files = None, environment: str | None = None, limits: Limits = None,
                  idempotency_key: str | None = None) -> Result:
        """As `Client.run`."""
        return await self.call(common.run_call(
            code, stdin=stdin, args=args, files=files, environment=environment, limits=limits,
            idempotency_key=idempotency_key, stream=False), Result)

    def stream(self, code: str, *, stdin: str = "", args: Sequence[str] = (),
               files: Files = None, environment: str | None = None, limits: Limits = None,
               idempotency_key: str | None = None) -> AsyncRunStream[Result]:
        """As `Client.stream`: `async for` its `Output`s, then `await stream.result()`."""
        return AsyncRunStream(self, common.run_call(
            code, stdin=stdin, args=args, files=files, environment=environment, limits=limits,
            idempotency_key=idempotency_key, stream=True), Result)

    async def session(self, *, limits: Limits = None, idle_timeout_s: float | None = None,
                      ttl_s: float | None = None, cpu_total_s: float | None = None,
                      files: dict[str, str | bytes] | None = None) -> AsyncSession:
        """As `Client.session`: end it with `await session.end()` or `async with`."""
        info = await self.call(common.session_call(
            limits=limits, idle_timeout_s=idle_timeout_s, ttl_s=ttl_s,
            cpu_total_s=cpu_total_s), SessionInfo)
        session = AsyncSession(self, info)
        try:
            for name, content in (files or {}).items():
                await session.upload(name, content)
        except BaseException:
            await session.end()
            raise
        return session

    async def attach(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self.call(Call("GET", common.session_path(session_id)),
                                                  SessionInfo))

    async def sessions(self) -> list[SessionInfo]:
        return (await self.call(Call("GET", "/v1/sessions"), SessionList)).sessions

    async def environments(self) -> Environments:
        return await self.call(Call("GET", "/v1/environments"), Environments)

    async def languages(self) -> Languages:
        return await self.call(Call("GET", "/v1/languages"), Languages)

    # -- calls -----------------------------------------------------------------------------

    async def call(self, call: Call, answer_type: type[T]) -> T:
        """One API call, retried as `Retry` allows; its answer as `answer_type`."""
        async def attempt() -> T:
            answer = await self.send(call)
            try:
                return common.answer(answer.status, answer.headers, await answer.read(),
                                     answer_type, call)
            finally:
                await answer.close()
        return await self.retrying(call, attempt)

    async def retrying(self, call: Call, attempt: Callable[[], Awaitable[T]]) -> T:
        retry = Retry(call, self.retries)
        while True:
            try:
                return await attempt()
            except StockadeError as exc:
                if (wait := retry.delay(exc)) is None:
                    raise
            await asyncio.sleep(wait)

    async def send(self, call: Call) -> AsyncAnswer:
        request = self._http.build_request(call.method, call.path, content=call.body,
                                           headers=call.headers(self.key))
        try:
            return AsyncAnswer(await self._http.send(request, stream=True), self.url)
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None


class AsyncAnswer(common.Answered):
    """An answer being read: transport failures as TransportError, its body under the cap."""

    async def read(self) -> bytes:
        raw = bytearray()
        try:
            async for chunk in self.response.aiter_bytes():
                common.append_capped(raw, chunk)
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None
        return bytes(raw)

    async def lines(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.aiter_lines():
                yield line
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None

    async def close(self) -> None:
        await self.response.aclose()


class AsyncRunStream(Generic[T]):
    """As `RunStream`: `async for` the `Output`s, then `await result()`."""

    def __init__(self, client: AsyncClient, call: Call, result_type: type[T]) -> None:
        self.client, self.call, self.result_type = client, call, result_type
        self._outputs: AsyncGenerator[Output, None] | None = None
        self._result: T | None = None

    async def __aenter__(self) -> AsyncRunStream[T]:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._outputs is not None:
            await self._outputs.aclose()

    def __aiter__(self) -> AsyncIterator[Output]:
        if self._outputs is None:
            self._outputs = self._read()
        return self._outputs

    async def _opened(self) -> AsyncAnswer:
        answer = await self.client.send(self.call)
        if answer.status < 400:
            return answer
        try:
            raise common.refusal(answer.status, answer.headers, await answer.read())
        finally:
            await answer.close()

    async def _read(self) -> AsyncGenerator[Output, None]:
        answer = await self.client.retrying(self.call, self._opened)
        try:
            if not common.is_stream(answer.headers):
                self._result = common.decode(await answer.read(), self.result_type, self.call)
                return
            events = Events(self.result_type)
            async for line in answer.lines():
                if (output := events.feed(line)) is not None:
                    yield output
            self._result = events.done()
        finally:
            await answer.close()

    async def result(self) -> T:
        """The run's record; awaiting it reads (and drops) any output not read yet."""
        async for _ in self:
            pass
        return common.finished(self._result)


class AsyncSession(common.SessionHandle[AsyncClient]):
    """As `Session`, awaited."""

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.end()

    async def run(self, code: str, stdin: str = "") -> CellResult:
        return await self.client.call(common.cell_call(self.id, code, stdin, False),
                                      CellResult)

    def stream(self, code: str, stdin: str = "") -> AsyncRunStream[CellResult]:
        return AsyncRunStream(self.client, common.cell_call(self.id, code, stdin, True),
                              CellResult)

    async def files(self) -> list[FileEntry]:
        return (await self.client.call(Call("GET", f"{common.session_path(self.id)}/files"),
                                       SessionFiles)).files

    async def upload(self, name: str, content: str | bytes) -> None:
        await self.client.call(common.upload_call(self.id, name, content), type(None))

    async def download(self, name: str) -> bytes:
        return await self.client.call(Call("GET", common.file_path(self.id, name)), bytes)

    async def remove(self, name: str) -> None:
        await self.client.call(Call("DELETE", common.file_path(self.id, name)), type(None))

    async def refresh(self) -> SessionInfo:
        self.info = await self.client.call(Call("GET", common.session_path(self.id)),
                                           SessionInfo)
        return self.info

    async def end(self) -> None:
        try:
            await self.client.call(Call("DELETE", common.session_path(self.id)), type(None))
        except ApiError as exc:
            if not common.ended_already(exc):
                raise
