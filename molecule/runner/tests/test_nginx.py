"""nginx in front of the runner: a slow client is cut off at ~10 s, an oversized body is
refused before it reaches the runner."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import testinfra.host

from conftest import Caller, Instance


def test_nginx_is_active_and_enabled(host: testinfra.host.Host) -> None:
    nginx = host.service("nginx")
    assert nginx.is_running and nginx.is_enabled


def test_config_is_valid_as_loaded(host: testinfra.host.Host) -> None:
    assert host.run("nginx -t -q").rc == 0


def test_slow_client_is_cut_off_at_about_ten_seconds(instance: Instance) -> None:
    """Headers dribbled one line then nothing: nginx closes at client_header_timeout."""
    with socket.create_connection((instance.ip, instance.port(80)), timeout=30) as sock:
        sock.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: stockade\r\n")
        started = time.monotonic()
        while sock.recv(4096):
            pass
        waited = time.monotonic() - started
    assert 9.0 <= waited <= 13.0, waited


def test_oversized_body_is_refused_with_413(instance: Instance) -> None:
    body = json.dumps({"code": "x" * (5 << 20)}).encode()
    request = urllib.request.Request(instance.url("/v1/runs"), data=body)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413


def test_health_through_nginx(instance: Instance) -> None:
    with urllib.request.urlopen(instance.url("/readyz"), timeout=10) as answer:
        assert answer.status == 200


def test_the_playground_and_the_api_docs_are_served(instance: Instance) -> None:
    """The pages come with the wheel (Swagger UI vendored at build time), behind nginx."""
    with urllib.request.urlopen(instance.url("/"), timeout=10) as answer:
        assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
        assert b"stockade playground" in answer.read()
    with urllib.request.urlopen(instance.url("/docs"), timeout=10) as answer:
        page = answer.read().decode()
    bundle = page.split('src="', 1)[1].split('"', 1)[0]
    assert bundle.startswith("/static/vendor/swagger-ui/swagger-ui-bundle.js?v=")
    request = urllib.request.Request(instance.url(bundle), headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Content-Encoding"] == "gzip"
        assert "immutable" in answer.headers["Cache-Control"]


def test_a_runs_output_streams_through_nginx_as_it_is_written(caller: Caller) -> None:
    """Server-sent events pass the deployed nginx at once, not when the run ends."""
    request = caller.request("/v1/runs", {
        "code": "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"})
    request.add_header("Accept", "text/event-stream")
    started = time.monotonic()
    seen: list[tuple[float, str]] = []
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        for line in answer:
            if line.startswith((b"event: ", b"data: ")):
                seen.append((time.monotonic() - started, line.decode().rstrip("\n")))
    lines = [text for _, text in seen]
    assert lines[:2] == ["event: stdout", 'data: "first\\n"'], lines
    assert lines[-2] == "event: result" and json.loads(lines[-1][6:])["status"] == "ok"
    assert seen[-1][0] - seen[1][0] >= 1.2, seen
