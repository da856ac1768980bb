"""MCP over HTTP on a deployed host: the official SDK's client reaches stockade-mcp through
nginx's /mcp with an API key, runs code and keeps a session's state; a foreign Host is
refused. (Every tool and error, over stdio and HTTP: tests/test_mcp.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent

from conftest import Caller


def text(result: Any) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


def test_an_agent_runs_code_and_keeps_a_session_through_nginx(caller: Caller) -> None:
    # Host: the name nginx and the MCP server know (allowed_hosts: loopback's, here).
    headers = {"Authorization": f"Bearer {caller.key}", "Host": "localhost"}

    async def scenario() -> None:
        transport = streamable_http_client(caller.instance.url("/mcp"),
                                           http_client=httpx2.AsyncClient(headers=headers))
        async with Client(transport) as mcp:
            assert "run_python" in {tool.name for tool in (await mcp.list_tools()).tools}
            ran = await mcp.call_tool("run_python", {"code": "print(6 * 7)"})
            assert not ran.is_error and "42" in text(ran), ran
            started = await mcp.call_tool("session_start", {})
            session = started.structured_content["id"]
            await mcp.call_tool("session_run", {"session_id": session, "code": "x = 41"})
            cell = await mcp.call_tool("session_run", {"session_id": session, "code": "x + 1"})
            assert "42" in text(cell), cell
            assert not (await mcp.call_tool("session_end", {"session_id": session})).is_error

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_a_foreign_host_is_refused(caller: Caller) -> None:
    answer = httpx2.post(caller.instance.url("/mcp"), content=b"{}", timeout=30, headers={
        "Host": "evil.example", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"})
    assert answer.status_code == 421, answer.text
