"""Streaming a run's output as server-sent events: read with a real SSE client (sseclient-py
over urllib3), straight from the runner and through nginx, and with `stockade run --stream`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from stockade.runner.front import streaming
from stockade.runner.local import Client, RunnerProcess
from support.sse import stream

STOCKADE = [sys.executable, "-m", "stockade"]
# Prints, sleeps, prints: the first line must arrive well before the run ends.
PRINT_SLEEP_PRINT = ("import sys, time\nprint('first', flush=True)\n"
                     "sys.stderr.write('warned\\n'); sys.stderr.flush()\n"
                     "time.sleep(1.5)\nprint('second')\n")


# -- units -------------------------------------------------------------------------------

@pytest.mark.parametrize(("accept", "wanted"), [
    ("text/event-stream", True), ("application/json, TEXT/EVENT-STREAM;q=0.9", True),
    ("application/json", False), ("*/*", False), ("", False)])
def test_a_stream_is_sent_only_to_a_client_that_names_it(accept: str, wanted: bool) -> None:
    request = make_mocked_request("POST", "/v1/runs", headers={"Accept": accept})
    assert streaming.wanted(request) is wanted


def test_an_events_data_is_one_json_line_whatever_the_output_holds() -> None:
    raw = streaming.event("stdout", "a\r\nb\n\n\x00c\r")
    name, data, end = raw.split(b"\n", 2)
    assert (name, end) == (b"event: stdout", b"\n")
    assert json.loads(data.removeprefix(b"data: ")) == "a\r\nb\n\n\x00c\r"


def test_pieces_waiting_together_become_one_event_per_stream_and_utf8_is_never_split() -> None:
    async def scenario() -> list[bytes]:
        events = streaming.RunEvents(asyncio.get_running_loop())
        events.started()
        for name, chunk in [("stdout", b"a"), ("stdout", "é".encode()[:1]),
                              ("stderr", b"oops\n"), ("stdout", "é".encode()[1:] + b"\n")]:
            events.output(name, chunk)
        await asyncio.sleep(0)  # the thread-safe calls land
        return events._pending(events.queue.get_nowait())

    assert asyncio.run(scenario()) == [streaming.event("stdout", "a"),
                                       streaming.event("stderr", "oops\n"),
                                       streaming.event("stdout", "é\n")]


# -- end to end --------------------------------------------------------------------------

def test_output_arrives_while_the_program_still_runs(api: Client) -> None:
    got = stream(api, {"code": PRINT_SLEEP_PRINT})
    assert got.status == 200, got.body
    assert got.headers["Content-Type"].startswith("text/event-stream")
    assert got.headers["X-Request-Id"]
    result = got.result
    assert result["status"] == "ok"
    assert got.text("stdout") == result["stdout"] == "first\nsecond\n"
    assert got.text("stderr") == result["stderr"] == "warned\n"
    # 'first' came before the sleep ended; the result came after it.
    assert got.events[-1][0] - got.first("stdout") >= 1.2, got.events


def test_a_stream_holds_to_the_output_cap(api: Client) -> None:
    got = stream(api, {"code": "while True: print('x' * 1000)", "limits": {"output_kib": 4}})
    assert got.result["status"] == "output_limit"
    assert got.text("stdout") == got.result["stdout"]
    assert len(got.text("stdout")) == 4096


def test_a_character_split_between_writes_arrives_whole(runner: RunnerProcess) -> None:
    code = ("import sys, time\nout = sys.stdout.buffer\nhalves = 'é'.encode()\n"
            "out.write(halves[:1]); out.flush(); time.sleep(0.3)\n"
            "out.write(halves[1:] + b'\\r\\n'); out.flush()\n")
    got = stream(runner, {"code": code})
    assert got.text("stdout") == got.result["stdout"] == "é\r\n"


def test_a_refusal_before_the_run_keeps_its_status_and_json_body(runner: RunnerProcess) -> None:
    got = stream(runner, {"code": 1})
    assert got.status == 422 and not got.events
    assert json.loads(got.body)["error"]["field"] == "code"
    over = stream(runner, {"code": "pass", "limits": {"memory_mib": 1 << 20}})
    assert over.status == 422 and json.loads(over.body)["error"]["field"] == "limits.memory_mib"


def test_stockade_run_stream_prints_output_as_it_comes(runner: RunnerProcess,
                                                        tmp_path: Path) -> None:
    program = tmp_path / "slow.py"
    program.write_text(PRINT_SLEEP_PRINT)
    started = time.monotonic()
    process = subprocess.Popen(
        [*STOCKADE, "run", "--stream", f"--url=http://127.0.0.1:{runner.port}", str(program)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    first = process.stdout.readline()
    first_at = time.monotonic() - started
    rest, errors = process.communicate(timeout=60)
    ended_at = time.monotonic() - started
    assert (first + rest, errors, process.returncode) == (b"first\nsecond\n", b"warned\n", 0)
    assert ended_at - first_at >= 1.2
    both = subprocess.run([*STOCKADE, "run", "--stream", "--json", str(program)],
                          capture_output=True, timeout=60, check=False)
    assert both.returncode == 2 and b"choose one" in both.stderr
