"""nginx in front of the runner: a slowloris client is cut off at ~10 s while everyone
else is served; large bodies wait on disk; request ids pass through.

client_header_timeout bounds the whole header, so a header dribbled a byte at a time is
cut at 10 s. client_body_timeout bounds the gap between two reads, so a stalled body is
cut at 10 s; a body dribbled faster than that is bounded by the body cap and limit_conn,
and never reaches the runner (nginx buffers the whole request first).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stockade.runner.local import NginxProcess, request


def dribble(port: int, opening: bytes, then: bytes) -> float:
    """Send `opening`, then one byte of `then` every 2 s (or nothing, if `then` is empty);
    return how long until nginx hung up."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(opening)
        if not then:
            with contextlib.suppress(OSError):
                sock.recv(4096)  # a 408 or a close, whichever nginx sends
            return time.monotonic() - started
        for byte in then:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(2.0)
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
            else:
                break  # nginx answered (408) and closes
        return time.monotonic() - started


def test_slow_headers_and_slow_body_are_cut_off_while_others_are_served(
        nginx: NginxProcess) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow_headers = pool.submit(dribble, nginx.port, b"POST /v1/runs HTTP/1.1\r\n",
                                   b"X-Slow: " + b"a" * 40)
        slow_body = pool.submit(dribble, nginx.port,
                                b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                                b"Content-Type: application/json\r\n\r\n{", b"")
        served = []
        while not (slow_headers.done() and slow_body.done()):
            result = nginx.post("/v1/runs", {"code": "print('served')"}).result()
            served.append(result.stdout)
            time.sleep(0.5)
        header_s, body_s = slow_headers.result(), slow_body.result()
    assert 9.0 <= header_s <= 14.0, header_s
    assert 9.0 <= body_s <= 14.0, body_s
    assert len(served) >= 5 and set(served) == {"served\n"}


def test_a_body_past_a_small_buffer_waits_on_disk_not_in_memory(nginx: NginxProcess) -> None:
    """A slow client's large body cannot pin nginx's memory: past 16 KiB it is on disk."""
    error_log = Path(nginx.dir.name) / "error.log"
    before = error_log.read_text().count("buffered to a temporary file")
    small = nginx.post("/v1/runs", {"code": "print(1)"})
    assert small.status == 200
    assert error_log.read_text().count("buffered to a temporary file") == before
    padded = nginx.post("/v1/runs", {"code": "print(2)\n" + "#" * (64 << 10)})
    assert padded.status == 200 and padded.result().stdout == "2\n"
    assert error_log.read_text().count("buffered to a temporary file") == before + 1


def test_nginx_passes_the_request_id_through_and_answers_its_own_errors_with_one(
        nginx: NginxProcess) -> None:
    mine = request(nginx.port, "GET", "/healthz", headers={"X-Request-Id": "trace-7"})
    assert mine.status == 200 and mine.headers["x-request-id"] == "trace-7"
    # nginx's own 413: the body never reaches the runner, the answer still has an id.
    too_big = nginx.post("/v1/runs", b"x" * ((nginx.runner.max_body_kib + 1) << 10))
    assert too_big.status == 413
    assert re.fullmatch(r"[0-9a-f]{32}", too_big.headers["x-request-id"])
    access_log = Path(nginx.dir.name) / "access.log"
    wanted = ["id=trace-7", f"id={too_big.headers['x-request-id']}"]
    deadline = time.monotonic() + 10  # nginx logs a refused body once it has drained it
    while not all(w in access_log.read_text() for w in wanted):
        assert time.monotonic() < deadline, access_log.read_text()
        time.sleep(0.1)


def _logged_client(proxy: NginxProcess, request_id: str) -> str:
    """The client address nginx logged (and keyed its per-client limits on) for a request."""
    access_log = Path(proxy.dir.name) / "access.log"
    deadline = time.monotonic() + 10
    while f"id={request_id}" not in access_log.read_text():
        assert time.monotonic() < deadline, access_log.read_text()
        time.sleep(0.1)
    line = next(line for line in access_log.read_text().splitlines()
                if f"id={request_id}" in line)
    return line.split()[0]


def test_behind_a_trusted_balancer_the_client_is_the_forwarded_address(
        nginx: NginxProcess) -> None:
    forwarded = {"X-Forwarded-For": "198.51.100.7"}
    # Not a trusted balancer: a client's own X-Forwarded-For changes nothing.
    request(nginx.port, "GET", "/healthz", headers={**forwarded, "X-Request-Id": "xff-1"})
    assert _logged_client(nginx, "xff-1") == "127.0.0.1"
    balanced = NginxProcess(nginx.runner, nginx.port + 7, trusted_proxies=["127.0.0.1"])
    balanced.start()
    try:
        request(balanced.port, "GET", "/healthz",
                headers={**forwarded, "X-Request-Id": "xff-2"})
        assert _logged_client(balanced, "xff-2") == "198.51.100.7"
    finally:
        balanced.stop()
