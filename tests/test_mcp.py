"""`stockade mcp`, driven by the official MCP SDK's own client against a live runner,
over stdio and over Streamable HTTP through nginx (the server as an unprivileged process of
its own): the tools, state across session_run calls, a figure as image content, limits and
refusals as tool errors that name the problem; the caller's key goes through; the sessions
a connection opened end with it; Host and Origin are checked."""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, ImageContent, TextContent

from stockade import client
from stockade.runner.local import NginxProcess, RunnerProcess

TOOLS = {"run_python", "session_start", "session_run", "session_files", "session_end",
         "list_environments"}
MCP_PORT, MCP_NGINX_PORT = 18091, 18092
NOBODY = 65534


@pytest.fixture(scope="module")
def mcp_http(runner: RunnerProcess) -> Iterator[str]:
    """`stockade mcp --http` for the runner, as nobody, behind an nginx with /mcp: its URL."""
    config = msgspec.structs.replace(runner.config, mcp_port=MCP_PORT)
    with tempfile.NamedTemporaryFile("wb", suffix=".json", prefix="stockade-mcp-") as file:
        file.write(msgspec.json.encode(config))
        file.flush()
        Path(file.name).chmod(0o644)
        server = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-m", "stockade", "mcp", "--http", f"--config={file.name}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd="/")
        proxy = NginxProcess(config, MCP_NGINX_PORT)
        try:
            _wait_for_port(MCP_PORT, server)
            proxy.start()
            yield f"http://127.0.0.1:{MCP_NGINX_PORT}/mcp"
        finally:
            proxy.stop()
            server.terminate()
            _, errors = server.communicate(timeout=30)
    # uvicorn ends a graceful stop by re-raising the SIGTERM it caught (systemd's success).
    assert server.returncode in (0, -signal.SIGTERM), errors.decode()[-3000:]
    assert b"Traceback" not in errors, errors.decode()[-3000:]


def _wait_for_port(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            probe.request("GET", "/")
            probe.getresponse()
            return
        except OSError:
            time.sleep(0.1)
        finally:
            probe.close()
    raise AssertionError(f"stockade mcp --http did not listen: {server.poll()}")


def stdio(runner: RunnerProcess) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[
        "-m", "stockade", "mcp", f"--url=http://127.0.0.1:{runner.port}"],
        env={"PATH": os.environ["PATH"]})


def over_http(url: str, headers: dict[str, str] | None = None) -> Any:
    return streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers))


@pytest.fixture(params=["stdio", "http"])
def server(request: pytest.FixtureRequest, runner: RunnerProcess) -> Callable[[], Any]:
    """How the test's MCP client reaches `stockade mcp`: a fresh transport each call."""
    if request.param == "stdio":
        return lambda: stdio(runner)
    url = request.getfixturevalue("mcp_http")
    return lambda: over_http(url)


def drive(server: Any, scenario: Callable[[Client], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with Client(server, **options) as mcp:
            await scenario(mcp)
    asyncio.run(asyncio.wait_for(main(), 180))


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def call(mcp: Client, tool: str, **arguments: Any) -> CallToolResult:
    return await mcp.call_tool(tool, arguments)


def test_the_tools_run_code_and_keep_a_sessions_state(server: Callable[[], Any]) -> None:
    async def scenario(mcp: Client) -> None:
        assert {tool.name for tool in (await mcp.list_tools()).tools} >= TOOLS
        ran = await call(mcp, "run_python", code="import sys; print(input() * 2)", stdin="ab")
        assert not ran.is_error and text(ran).startswith("status: ok"), ran
        assert "abab" in text(ran) and ran.structured_content["stdout"] == "abab\n"

        started = await call(mcp, "session_start", idle_timeout_s=60)
        session = started.structured_content["id"]
        await call(mcp, "session_run", session_id=session, code="x = 20")
        cell = await call(mcp, "session_run", session_id=session, code="x + 22")
        assert not cell.is_error and "42" in text(cell), cell

        uploaded = await call(mcp, "session_files", session_id=session, action="upload",
                              name="d/in.bin", content=base64.b64encode(b"\xff\x00").decode(),
                              encoding="base64")
        assert not uploaded.is_error, uploaded
        listed = await call(mcp, "session_files", session_id=session, action="list")
        assert {"name": "d/in.bin", "size": 2} in listed.structured_content["files"]
        down = await call(mcp, "session_files", session_id=session, action="download",
                          name="d/in.bin")
        assert down.structured_content == {"name": "d/in.bin", "content": "/wA=",
                                           "encoding": "base64", "size": 2}
        ended = await call(mcp, "session_end", session_id=session)
        assert not ended.is_error
        environments = await call(mcp, "list_environments")
        assert "(default)" in text(environments)

    drive(server(), scenario)


FIGURE = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 3, 2])\nNone"
OUT_PNG = ("import os, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
           "os.makedirs('out', exist_ok=True)\nplt.plot([1, 2])\nplt.savefig('out/plot.png')")


def test_figures_come_back_as_image_content(server: Callable[[], Any]) -> None:
    async def scenario(mcp: Client) -> None:
        session = (await call(mcp, "session_start")).structured_content["id"]
        cell = await call(mcp, "session_run", session_id=session, code=FIGURE)
        images = [b for b in cell.content if isinstance(b, ImageContent)]
        assert [i.mime_type for i in images] == ["image/png"], cell.content
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
        await call(mcp, "session_end", session_id=session)
        ran = await call(mcp, "run_python", code=OUT_PNG)
        assert [b.mime_type for b in ran.content if isinstance(b, ImageContent)] == \
            ["image/png"], ran

    drive(server(), scenario)


def test_limits_and_refusals_are_tool_errors_that_name_the_problem(
        server: Callable[[], Any]) -> None:
    async def scenario(mcp: Client) -> None:
        spin = await call(mcp, "run_python", code="while True: pass",
                          limits={"cpu_time_s": 0.2})
        assert spin.is_error and "time_limit" in text(spin), spin
        assert spin.structured_content["status"] == "time_limit"
        failed = await call(mcp, "run_python", code="1/0")
        assert failed.is_error and "ZeroDivisionError" in text(failed)
        unknown = await call(mcp, "run_python", code="print(1)", environment="cobol-85")
        assert unknown.is_error and "unknown_environment" in text(unknown), unknown
        session = (await call(mcp, "session_start")).structured_content["id"]
        bad_name = await call(mcp, "session_files", session_id=session, action="download",
                              name="../etc/passwd")
        assert bad_name.is_error and "unsafe file name" in text(bad_name), bad_name
        await call(mcp, "session_end", session_id=session)
        gone = await call(mcp, "session_run", session_id=session, code="1")
        assert gone.is_error and "session_not_found" in text(gone), gone
        no_such = await call(mcp, "session_run", session_id="nonexistent", code="1")
        assert no_such.is_error and "session_not_found" in text(no_such)

    drive(server(), scenario)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_the_sessions_a_connection_opened_end_with_it(runner: RunnerProcess, transport: str,
                                                      request: pytest.FixtureRequest) -> None:
    """The server process's end (stdio), or the MCP session's (HTTP, a handshake-era client:
    the 2026-07-28 protocol has no session to end)."""
    opened: list[str] = []

    async def scenario(mcp: Client) -> None:
        for _ in range(2):
            opened.append((await call(mcp, "session_start")).structured_content["id"])

    if transport == "stdio":
        drive(stdio(runner), scenario)
    else:
        drive(over_http(request.getfixturevalue("mcp_http")), scenario, mode="legacy")
    with client.Client(f"http://127.0.0.1:{runner.port}") as runner_api:
        deadline = time.monotonic() + 10
        while set(opened) & {s.id for s in runner_api.sessions()}:
            assert time.monotonic() < deadline, f"sessions {opened} outlived their connection"
            time.sleep(0.1)


def test_each_call_carries_its_callers_key(mcp_http: str) -> None:
    """Over HTTP the server has no key of its own: a caller's wrong key reaches the runner,
    which refuses it."""
    async def scenario(mcp: Client) -> None:
        refused = await call(mcp, "run_python", code="print(1)")
        assert refused.is_error and "refused: invalid_key" in text(refused), refused

    drive(over_http(mcp_http, {"Authorization": "Bearer stk_000000000000_wrong"}), scenario)


@pytest.mark.parametrize(("headers", "status"), [
    ({"Host": "evil.example"}, 421),
    ({"Origin": "http://evil.example"}, 403),
])
def test_a_foreign_host_or_origin_is_refused(mcp_http: str, headers: dict[str, str],
                                             status: int) -> None:
    body = msgspec.json.encode({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    answer = httpx2.post(mcp_http, content=body, headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        **headers})
    assert answer.status_code == status, (answer.status_code, answer.text)
