"""nginx in front of the runner: a slowloris client is cut off at ~10 s while everyone
else is served.

client_header_timeout bounds the whole header, so a header dribbled a byte at a time is
cut at 10 s. client_body_timeout bounds the gap between two reads, so a stalled body is
cut at 10 s; a body dribbled faster than that is bounded by the body cap and limit_conn,
and never reaches the runner (nginx buffers the whole request first).
"""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from stockade.runner.local import NginxProcess


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
