"""The Python client's own logic, against a scripted HTTP server on this host's loopback:
what it retries and when, how it reads refusals and streams, what it refuses to send. (The
client against a real runner: test_client.py.)"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import pytest

from stockade import client
from stockade.client import common
from stockade.client.common import Call, Events, Retry

RESULT = msgspec.json.encode({"status": "ok", "exit_code": 0, "stdout": "1\n"})


def refusal_body(code: str, field_name: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": f"because {code}",
                                          "field": field_name, "request_id": "rid-1"}})


@dataclass
class Scripted:
    """Answers: each (status, headers, body) in turn, or None to drop the connection after
    reading the request; what it received, in order."""

    answers: list[tuple[int, dict[str, str], bytes] | None]
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


@pytest.fixture
def scripted() -> Iterator[Callable[..., tuple[str, Scripted]]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(*answers: tuple[int, dict[str, str], bytes] | None) -> tuple[str, Scripted]:
        script = Scripted(list(answers))

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                script.seen.append((self.command, self.path, dict(self.headers), body))
                script.times.append(time.monotonic())
                answer = script.answers.pop(0)
                if answer is None:
                    self.close_connection = True
                    return
                status, headers, payload = answer
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *_args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_refusal_before_the_start_is_retried_after_its_retry_after(scripted) -> None:
    url, script = scripted((503, {"Retry-After": "1"}, refusal_body("queue_full")),
                           (200, {}, RESULT))
    with client.Client(url) as runner:
        result = runner.run("print(1)")
    assert result.stdout == "1\n" and len(script.seen) == 2
    assert script.times[1] - script.times[0] >= 0.95


def test_retries_stop_after_three_tries_and_raise_the_refusal(scripted) -> None:
    url, script = scripted(*[(429, {"Retry-After": "0"}, refusal_body("rate_limited"))] * 4)
    with client.Client(url) as runner, pytest.raises(client.ApiError) as caught:
        runner.run("print(1)")
    assert len(script.seen) == 3
    error = caught.value
    assert (error.status, error.code, error.request_id, error.retry_after) == \
        (429, "rate_limited", "rid-1", 0.0)


def test_a_retry_after_past_the_budget_is_not_waited_for(scripted) -> None:
    url, script = scripted((503, {"Retry-After": "120"}, refusal_body("queue_full")))
    started = time.monotonic()
    with client.Client(url) as runner, pytest.raises(client.ApiError, match="queue_full"):
        runner.run("print(1)")
    assert len(script.seen) == 1 and time.monotonic() - started < 5


@pytest.mark.parametrize("answer", [
    (400, {}, refusal_body("invalid_request", "limits.memory_mib")),
    (500, {}, refusal_body("internal_error")),
    (503, {}, b"<html>a balancer's page</html>"),  # not the runner's word: maybe it ran
])
def test_other_refusals_are_raised_at_once_with_the_apis_words(scripted, answer) -> None:
    url, script = scripted(answer)
    with client.Client(url) as runner, pytest.raises(client.ApiError) as caught:
        runner.run("print(1)")
    assert len(script.seen) == 1 and caught.value.status == answer[0]
    if answer[0] == 400:
        assert caught.value.field == "limits.memory_mib"
        assert str(caught.value) == ("invalid_request (limits.memory_mib): because "
                                     "invalid_request [HTTP 400; request rid-1]")


def test_a_dropped_connection_is_retried_only_with_an_idempotency_key(scripted) -> None:
    url, script = scripted(None, None, (200, {}, RESULT))
    with client.Client(url) as runner:
        with pytest.raises(client.TransportError) as caught:
            runner.run("print(1)")
        assert caught.value.sent and len(script.seen) == 1
        assert runner.run("print(1)", idempotency_key="k-1").status == "ok"
    assert len(script.seen) == 3
    assert script.seen[2][2]["Idempotency-Key"] == "k-1"
    assert script.seen[1][3] == script.seen[2][3]  # the same body, sent again


def test_an_unreachable_runner_is_tried_three_times_then_named() -> None:
    with client.Client("http://127.0.0.1:9") as runner, \
            pytest.raises(client.TransportError, match=r"127\.0\.0\.1:9") as caught:
        runner.run("print(1)")
    assert not caught.value.sent


def test_the_request_carries_the_key_and_the_typed_body(scripted) -> None:
    url, script = scripted((200, {}, RESULT))
    with client.Client(url, key="sk-test") as runner:
        runner.run("print(1)", stdin="in", args=["a"], files={"t.txt": "x", "b.bin": b"\xff"},
                   limits={"cpu_time_s": 2}, environment="python-3.13")
    _, path, headers, body = script.seen[0]
    assert path == "/v1/runs" and headers["Authorization"] == "Bearer sk-test"
    assert msgspec.json.decode(body) == {
        "code": "print(1)", "language": "python", "environment": "python-3.13",
        "stdin": "in", "args": ["a"],
        "files": [{"name": "t.txt", "content": "x", "encoding": "utf8"},
                  {"name": "b.bin", "content": "/w==", "encoding": "base64"}],
        "limits": {"cpu_time_s": 2.0, "wall_time_s": None, "memory_mib": None,
                   "processes": None, "output_kib": None, "file_size_kib": None}}


def test_bad_input_is_refused_before_anything_is_sent(scripted) -> None:
    url, script = scripted()
    with client.Client(url) as runner:
        with pytest.raises(ValueError, match="limits"):
            runner.run("print(1)", limits={"cpu_seconds": 2})
        with pytest.raises(ValueError, match="unsafe file name"):
            client.Session(runner, _info("s-1")).download("../etc/passwd")
    with pytest.raises(ValueError, match="http:// or https://"):
        client.Client("ftp://127.0.0.1")
    assert script.seen == []


def _info(session_id: str) -> client.SessionInfo:
    return msgspec.convert({
        "id": session_id, "state": "idle", "created_at": "", "expires_at": "",
        "idle_timeout_s": 1, "ttl_s": 1, "cpu_total_s": 1, "calls": 0, "cpu_time_s": 0,
        "memory_peak_kib": 0, "limits": {"cpu_time_s": 1, "wall_time_s": 1, "memory_mib": 64,
                                         "processes": 8, "output_kib": 64,
                                         "file_size_kib": 64}}, client.SessionInfo)


STREAM = (b'event: stdout\ndata: "a\\n"\n\nevent: stderr\ndata: "b"\n\n: a comment\n\n'
          b"event: result\ndata: " + RESULT + b"\n\n")


def test_a_stream_yields_the_output_then_the_record(scripted) -> None:
    url, _ = scripted((200, {"Content-Type": "text/event-stream"}, STREAM))
    with client.Client(url) as runner, runner.stream("print(1)") as stream:
        assert list(stream) == [client.Output("stdout", "a\n"), client.Output("stderr", "b")]
        assert stream.result.stdout == "1\n"


def test_an_async_stream_yields_the_output_then_the_record(scripted) -> None:
    url, script = scripted((503, {"Retry-After": "0"}, refusal_body("queue_full")),
                           (200, {"Content-Type": "text/event-stream"}, STREAM))

    async def scenario() -> tuple[list[client.Output], client.Result]:
        async with client.AsyncClient(url) as runner, runner.stream("print(1)") as stream:
            outputs = [output async for output in stream]
            return outputs, await stream.result()

    outputs, result = asyncio.run(scenario())
    assert [o.text for o in outputs] == ["a\n", "b"] and result.exit_code == 0
    assert len(script.seen) == 2 and script.seen[1][2]["Accept"] == "text/event-stream"


def test_a_stream_that_ends_without_a_result_is_an_error(scripted) -> None:
    url, _ = scripted((200, {"Content-Type": "text/event-stream"}, STREAM.split(b"event: r")[0]))
    with client.Client(url) as runner, runner.stream("print(1)") as stream, \
            pytest.raises(client.AnswerError, match="without a result"):
        stream.result  # noqa: B018


def test_an_answer_that_is_not_the_record_is_an_answer_error(scripted) -> None:
    url, _ = scripted((200, {}, b'{"status": "exploded"}'))
    with client.Client(url) as runner, pytest.raises(client.AnswerError, match="/v1/runs"):
        runner.run("print(1)")


def test_the_retry_policy_counts_tries_and_time() -> None:
    now = [0.0]
    busy = client.ApiError(503, "queue_full", "busy", retry_after=20)
    retry = Retry(Call("POST", "/v1/runs"), clock=lambda: now[0])
    assert retry.delay(busy) == 20
    now[0] = 20
    assert retry.delay(busy) == 20
    assert retry.delay(busy) is None  # the third try was the last
    late = Retry(Call("POST", "/v1/runs"), clock=lambda: now[0])
    now[0] = 65
    assert late.delay(busy) is None  # 45 s in: another 20 is past the 60 s budget
    assert Retry(Call("POST", "/v1/runs"), enabled=False).delay(busy) is None
    lost = client.TransportError("gone", sent=True)
    assert Retry(Call("POST", "/v1/runs")).delay(lost) is None
    assert Retry(Call("GET", "/v1/sessions")).delay(lost) == 0.5
    assert Retry(Call("POST", "/v1/runs", idempotency_key="k")).delay(lost) == 0.5


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert common.retry_after("3") == 3.0
    assert common.retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    assert common.retry_after("soon") is None and common.retry_after(None) is None


def test_events_are_capped() -> None:
    events = Events(client.Result)
    with pytest.raises(client.AnswerError, match="cap"):
        for _ in range(common.MAX_ANSWER // (1 << 20) + 2):
            events.feed("data: " + "x" * (1 << 20))


def test_calls_made_on_a_callers_behalf_carry_its_key_and_request_id(scripted) -> None:
    url, script = scripted((200, {}, RESULT), (200, {}, RESULT))
    with client.Client(url, key="own") as runner:
        with client.forwarding("theirs", "rid-7"):
            runner.run("print(1)")
        runner.run("print(1)")
    forwarded, own = script.seen[0][2], script.seen[1][2]
    assert (forwarded["Authorization"], forwarded["X-Request-Id"]) == ("Bearer theirs", "rid-7")
    assert own["Authorization"] == "Bearer own" and "X-Request-Id" not in own


def test_the_cli_names_the_key_variable_the_client_reads() -> None:
    """`stockade run` and `session` leave the key to the client's default."""
    from stockade.cli_args import KEY_ENV  # noqa: PLC0415

    assert KEY_ENV == common.KEY_ENV
