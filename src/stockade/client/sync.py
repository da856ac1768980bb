"""The blocking client: `Client` for runs and the runner's catalogue, `Session` for an
interpreter that keeps its state across calls, `RunStream` for output as it is written.

    with Client("http://127.0.0.1:8080") as runner:
        print(runner.run("print(6 * 7)").stdout)
        with runner.session() as session:
            session.run("x = 6 * 7")
            print(session.run("x").outputs[0].data)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
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


class Client:
    """A runner at `url` (default $STOCKADE_URL, else a local one), called with `key`
    (default $STOCKADE_API_KEY; none for a runner that serves callers without one).
    Refusals made before anything ran are retried after their Retry-After (`retries`)."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout_s: float = common.TIMEOUT_S, retries: bool = True) -> None:
        self.url, self.key = common.where(url, key)
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- runs ------------------------------------------------------------------------------

    def run(self, code: str, *, stdin: str = "", args: Sequence[str] = (), files: Files = None,
            environment: str | None = None, limits: Limits = None,
            idempotency_key: str | None = None) -> Result:
        """Run `code` once, confined; its result record (a program's failure is a result,
        not an exception). `files` go into its working directory; what it leaves in out/
        comes back in `result.files` (`save_files` writes them)."""
        return self.call(common.run_call(
            code, stdin=stdin, args=args, files=files, environment=environment, limits=limits,
            idempotency_key=idempotency_key, stream=False), Result)

    def stream(self, code: str, *, stdin: str = "", args: Sequence[str] = (),
               files: Files = None, environment: str | None = None, limits: Limits = None,
               idempotency_key: str | None = None) -> RunStream[Result]:
        """Run `code`, its output as it is written: iterate the stream for `Output`s, then
        read `.result`. Use it in a `with` block (or iterate it to the end)."""
        return RunStream(self, common.run_call(
            code, stdin=stdin, args=args, files=files, environment=environment, limits=limits,
            idempotency_key=idempotency_key, stream=True), Result)

    # -- sessions --------------------------------------------------------------------------

    def session(self, *, limits: Limits = None, idle_timeout_s: float | None = None,
                ttl_s: float | None = None, cpu_total_s: float | None = None,
                files: dict[str, str | bytes] | None = None) -> Session:
        """A new session (ended by `end()`, or at the end of a `with` block), with `files`
        written into its working directory."""
        info = self.call(common.session_call(limits=limits, idle_timeout_s=idle_timeout_s,
                                             ttl_s=ttl_s, cpu_total_s=cpu_total_s),
                         SessionInfo)
        session = Session(self, info)
        try:
            for name, content in (files or {}).items():
                session.upload(name, content)
        except BaseException:
            session.end()
            raise
        return session

    def attach(self, session_id: str) -> Session:
        """A session that exists already (a caller's own, by its id)."""
        return Session(self, self.call(Call("GET", common.session_path(session_id)),
                                       SessionInfo))

    def sessions(self) -> list[SessionInfo]:
        return self.call(Call("GET", "/v1/sessions"), SessionList).sessions

    # -- the runner ------------------------------------------------------------------------

    def environments(self) -> Environments:
        return self.call(Call("GET", "/v1/environments"), Environments)

    def languages(self) -> Languages:
        return self.call(Call("GET", "/v1/languages"), Languages)

    # -- calls -----------------------------------------------------------------------------

    def call(self, call: Call, answer_type: type[T]) -> T:
        """One API call, retried as `Retry` allows; its answer as `answer_type`."""
        def attempt() -> T:
            answer = self.send(call)
            try:
                return common.answer(answer.status, answer.headers, answer.read(),
                                     answer_type, call)
            finally:
                answer.close()
        return self.retrying(call, attempt)

    def retrying(self, call: Call, attempt: Callable[[], T]) -> T:
        retry = Retry(call, self.retries)
        while True:
            try:
                return attempt()
            except StockadeError as exc:
                if (wait := retry.delay(exc)) is None:
                    raise
            time.sleep(wait)

    def send(self, call: Call) -> Answer:
        """`call` sent; its answer open for reading (close it)."""
        request = self._http.build_request(call.method, call.path, content=call.body,
                                           headers=call.headers(self.key))
        try:
            return Answer(self._http.send(request, stream=True), self.url)
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None


class Answer(common.Answered):
    """An answer being read: transport failures as TransportError, its body under the cap."""

    def read(self) -> bytes:
        raw = bytearray()
        try:
            for chunk in self.response.iter_bytes():
                common.append_capped(raw, chunk)
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None
        return bytes(raw)

    def lines(self) -> Iterator[str]:
        try:
            yield from self.response.iter_lines()
        except httpx.TransportError as exc:
            raise common.transport_error(exc, self.url) from None

    def close(self) -> None:
        self.response.close()


class RunStream(Generic[T]):
    """A run's output as it comes (`Output`s), then its record (`.result`). A refusal made
    before the run started is raised when the stream opens, and retried as calls are; once
    it has started, nothing is sent again."""

    def __init__(self, client: Client, call: Call, result_type: type[T]) -> None:
        self.client, self.call, self.result_type = client, call, result_type
        self._outputs: Iterator[Output] | None = None
        self._result: T | None = None

    def __enter__(self) -> RunStream[T]:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading (the run itself goes on to its end, as a hung-up client's does)."""
        if isinstance(self._outputs, Generator):
            self._outputs.close()

    def __iter__(self) -> Iterator[Output]:
        if self._outputs is None:
            self._outputs = self._read()
        return self._outputs

    def _opened(self) -> Answer:
        answer = self.client.send(self.call)
        if answer.status < 400:
            return answer
        try:
            raise common.refusal(answer.status, answer.headers, answer.read())
        finally:
            answer.close()

    def _read(self) -> Generator[Output, None, None]:
        answer = self.client.retrying(self.call, self._opened)
        try:
            if not common.is_stream(answer.headers):  # a runner that answers with the record
                self._result = common.decode(answer.read(), self.result_type, self.call)
                return
            events = Events(self.result_type)
            for line in answer.lines():
                if (output := events.feed(line)) is not None:
                    yield output
            self._result = events.done()
        finally:
            answer.close()

    @property
    def result(self) -> T:
        """The run's record; reading it reads (and drops) any output not read yet."""
        for _ in self:
            pass
        return common.finished(self._result)


class Session(common.SessionHandle[Client]):
    """A session: an interpreter in a confined process that keeps its state across calls."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.end()

    def run(self, code: str, stdin: str = "") -> CellResult:
        """Run a cell; its record, with what it showed in `.outputs` (a value's repr, a
        table's HTML, a figure's PNG)."""
        return self.client.call(common.cell_call(self.id, code, stdin, False), CellResult)

    def stream(self, code: str, stdin: str = "") -> RunStream[CellResult]:
        return RunStream(self.client, common.cell_call(self.id, code, stdin, True), CellResult)

    def files(self) -> list[FileEntry]:
        """The files in the session's working directory (a cap applies: `SessionFiles`)."""
        return self.client.call(Call("GET", f"{common.session_path(self.id)}/files"),
                                SessionFiles).files

    def upload(self, name: str, content: str | bytes) -> None:
        self.client.call(common.upload_call(self.id, name, content), type(None))

    def download(self, name: str) -> bytes:
        return self.client.call(Call("GET", common.file_path(self.id, name)), bytes)

    def remove(self, name: str) -> None:
        self.client.call(Call("DELETE", common.file_path(self.id, name)), type(None))

    def refresh(self) -> SessionInfo:
        """The session's state and usage now."""
        self.info = self.client.call(Call("GET", common.session_path(self.id)), SessionInfo)
        return self.info

    def end(self) -> None:
        """End the session; one that has ended already is left as it is."""
        try:
            self.client.call(Call("DELETE", common.session_path(self.id)), type(None))
        except ApiError as exc:
            if not common.ended_already(exc):
                raise
