"""`stockade mcp`: a Model Context Protocol server (the official `mcp` SDK) whose tools run
code on a runner through the Python client, for agents.

Each tool's result is text first (what a model reads), then the record as structured
content; figures come back as image content. A program's failure or a limit it hit is a
tool result with `isError`, as is a refusal (an unknown environment, a bad file name, an
ended session), in the API's words; only a broken request is a protocol error. The
sessions a connection opens end when it does (or at their own timeouts)."""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field, create_model
from starlette.applications import Starlette

from stockade import __version__, client
from stockade import limits as limits_module
from stockade.client.common import FORWARDED, file_bytes

INSTRUCTIONS = (
    "Runs Python programs in confined, disposable sandboxes on a stockade runner. "
    "run_python runs a program once; sessions keep an interpreter's state across "
    "session_run calls (start one with session_start, end it with session_end). A program "
    "writes files for the caller under out/ (PNG files come back as images); in a session, "
    "the value of a cell's last expression is shown, and matplotlib figures come back as "
    "images. There is no network inside the sandbox.")
PNG = "image/png"
MAX_TEXT = 64 * 1024  # characters of stdout or stderr put in a result's text
ToolMethod = Callable[..., Awaitable[CallToolResult]]
END_WITHIN_S = 10.0  # what a connection's end gives its sessions' ends
STDIO = ""  # the one connection of a server on stdio
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")  # names a Host and an Origin may always use
MAX_TRACKED = 256  # sessions a connection's end ends, at most (the newest)


class InputFile(BaseModel):
    name: Annotated[str, Field(description="a relative path in the working directory")]
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


# Each limit as `limits.py` declares it (its type and meaning), for the tools' schema.
if TYPE_CHECKING:
    from stockade.runner.config import RunnerConfig

    LimitArgs = BaseModel
else:
    LimitArgs = create_model(
        "LimitArgs", __doc__="Each left out takes the runner's default; each is capped by "
        "its policy (for a session: memory and processes for its life; CPU time, wall time "
        "and output per call).",
        **{f.name: (f.kind | None, Field(None, description=f.description))
           for f in limits_module.FIELDS})


def _limits(limits: LimitArgs | None) -> client.LimitsIn | None:
    return None if limits is None else client.LimitsIn(**limits.model_dump())


def _files(files: list[InputFile] | None) -> list[client.FileIn]:
    return [client.FileIn(f.name, f.content, f.encoding) for f in files or []]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n[... cut here]"


def _summary(result: client.Result) -> str:
    """What a model reads first: the status, then the program's output."""
    lines = [f"status: {result.status}" + (f" ({result.message})" if result.message else "")]
    if result.stdout:
        lines.append(f"stdout:\n{_clip(result.stdout)}")
    if result.stderr:
        lines.append(f"stderr:\n{_clip(result.stderr)}")
    return "\n".join(lines)


def _failed(result: client.Result) -> bool:
    return result.status != client.Status.OK


def _record(result: client.Result, content: list[ContentBlock]) -> CallToolResult:
    return CallToolResult(content=content, structured_content=msgspec.to_builtins(result),
                          is_error=_failed(result))


def _refused(error: Exception) -> CallToolResult:
    """A refusal as a tool error the model can act on."""
    if isinstance(error, client.ApiError):
        where = f" (field {error.field})" if error.field else ""
        text = f"refused: {error.code}{where}: {error.message}"
    else:
        text = f"error: {error}"
    return CallToolResult(content=[TextContent(text=text)], is_error=True)


def _headers(ctx: Context) -> dict[str, str]:
    """The MCP request's HTTP headers (none over stdio)."""
    return {k.lower(): v for k, v in (ctx.headers or {}).items()}


def _connection(ctx: Context) -> str | None:
    """The connection a request belongs to, whose end ends the sessions it opened: over
    stdio the one connection (""), over HTTP its MCP session (a handshake-era client's
    Mcp-Session-Id, which the SDK has checked). A stateless request (protocol 2026-07-28)
    has none (None), whatever headers it sends: its sessions end by session_end or at
    their own timeouts."""
    if ctx.headers is None:
        return STDIO
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    return _headers(ctx).get("mcp-session-id")


def _caller(method: ToolMethod) -> ToolMethod:
    """The tool called with its caller's key and request id on every call to the runner
    (over HTTP: the MCP request's `Authorization` and `X-Request-Id`; over stdio there are
    none, and the server's own key is used)."""
    @functools.wraps(method)
    async def call(self: Tools, *args: Any, ctx: Context, **kwargs: Any) -> CallToolResult:
        headers = _headers(ctx)
        scheme, _, key = headers.get("authorization", "").partition(" ")
        with client.forwarding(key if scheme.lower() == "bearer" else None,
                               headers.get("x-request-id")):
            return await method(self, *args, ctx=ctx, **kwargs)
    return call


class Tools:
    """The tools, on one runner client; the sessions each connection opened (an MCP
    session over HTTP; the one connection over stdio)."""

    def __init__(self, runner: client.AsyncClient) -> None:
        self.runner = runner
        self.opened: dict[str, dict[str, client.AsyncSession]] = {}
        # The caller's forwarded headers for each connection: its sessions are ended with
        # its key when the connection ends, with no request of its own to carry it.
        self.callers: dict[str, Mapping[str, str]] = {}

    async def end_connection(self, connection: str) -> None:
        """End the sessions `connection` opened (its MCP session is over)."""
        sessions = self.opened.pop(connection, {})
        token = FORWARDED.set(self.callers.pop(connection, {}))
        try:
            for session in sessions.values():
                with contextlib.suppress(client.StockadeError):
                    await session.end()
        finally:
            FORWARDED.reset(token)

    async def end_all(self) -> None:
        for connection in list(self.opened):
            await self.end_connection(connection)

    def _mine(self, ctx: Context) -> dict[str, client.AsyncSession]:
        """The sessions the request's connection opened (none to keep without one)."""
        connection = _connection(ctx)
        return {} if connection is None else self.opened.setdefault(connection, {})

    def _session(self, ctx: Context, session_id: str) -> client.AsyncSession:
        found = self._mine(ctx).get(session_id)
        if found is None:  # one this connection did not open: the runner decides
            found = client.AsyncSession(self.runner, _unknown_info(session_id))
        return found

    @_caller
    async def run_python(
        self,
        code: Annotated[str, Field(description="the program (main.py)")],
        *,
        stdin: str = "",
        args: list[str] | None = None,
        files: list[InputFile] | None = None,
        environment: Annotated[str | None, Field(
            description="see list_environments; left out, the default")] = None,
        limits: LimitArgs | None = None,
        ctx: Context,
    ) -> CallToolResult:
        """Run a Python program once in a fresh sandbox; its output, status and usage, and
        the PNG files it left under out/ as images."""
        try:
            result = await self.runner.run(code, stdin=stdin, args=args or [],
                                           files=_files(files), environment=environment,
                                           limits=_limits(limits))
        except (client.StockadeError, ValueError) as exc:
            return _refused(exc)
        content: list[ContentBlock] = [TextContent(text=_summary(result))]
        for item in result.files:
            if item.name.lower().endswith(".png") and item.encoding == "base64":
                content.append(ImageContent(data=item.content, mime_type=PNG))
        return _record(result, content)

    @_caller
    async def session_start(
        self,
        *,
        limits: LimitArgs | None = None,
        idle_timeout_s: float | None = None,
        ttl_s: float | None = None,
        cpu_total_s: float | None = None,
        ctx: Context,
    ) -> CallToolResult:
        """Start a session: a Python interpreter that keeps its state (variables, imports,
        files) across session_run calls. It ends with session_end, when this connection
        ends, or at its idle timeout or time to live."""
        try:
            session = await self.runner.session(limits=_limits(limits),
                                                idle_timeout_s=idle_timeout_s, ttl_s=ttl_s,
                                                cpu_total_s=cpu_total_s)
        except (client.StockadeError, ValueError) as exc:
            return _refused(exc)
        mine = self._mine(ctx)
        if len(mine) >= MAX_TRACKED:  # the oldest is left to its own timeouts
            mine.pop(next(iter(mine)))
        mine[session.id] = session
        if (connection := _connection(ctx)) is not None:
            self.callers[connection] = FORWARDED.get()
        info = session.info
        text = (f"session {session.id} started: idle timeout {info.idle_timeout_s:g} s, "
                f"time to live {info.ttl_s:g} s, {info.cpu_total_s:g} CPU-seconds in all")
        return CallToolResult(content=[TextContent(text=text)],
                              structured_content=msgspec.to_builtins(info))

    @_caller
    async def session_run(self, session_id: str, code: str, stdin: str = "", *,
                          ctx: Context) -> CallToolResult:
        """Run a cell in a session: its output, the value of its last expression, and its
        figures as images."""
        try:
            cell = await self._session(ctx, session_id).run(code, stdin)
        except (client.StockadeError, ValueError) as exc:
            return _refused(exc)
        content: list[ContentBlock] = [TextContent(text=_summary(cell))]
        for output in cell.outputs:
            if output.mime == PNG:
                content.append(ImageContent(data=output.data, mime_type=PNG))
            else:
                content.append(TextContent(text=_clip(output.data)))
        if cell.session_ended:
            self._mine(ctx).pop(session_id, None)
            content.append(TextContent(text="the session has ended"))
        return _record(cell, content)

    @_caller
    async def session_files(
        self,
        session_id: str,
        action: Literal["list", "upload", "download"],
        *,
        name: Annotated[str | None, Field(
            description="the file's relative path (upload, download)")] = None,
        content: Annotated[str | None, Field(description="what to upload")] = None,
        encoding: Literal["utf8", "base64"] = "utf8",
        ctx: Context,
    ) -> CallToolResult:
        """List, upload or download the files in a session's working directory. A file
        downloads as UTF-8 text if it is, else as base64."""
        session = self._session(ctx, session_id)
        try:
            if action == "list":
                files = await session.files()
                text = "\n".join(f"{f.name} ({f.size} bytes)" for f in files) or "no files"
                return CallToolResult(content=[TextContent(text=text)], structured_content={
                    "files": msgspec.to_builtins(files)})
            if name is None:
                return _refused(ValueError(f"{action} needs the file's name"))
            if action == "upload":
                if content is None:
                    return _refused(ValueError("upload needs the file's content"))
                data = file_bytes(client.OutFile(name=name, content=content,
                                                 encoding=encoding))
                await session.upload(name, data)
                return CallToolResult(content=[TextContent(
                    text=f"wrote {name} ({len(data)} bytes)")])
            raw = await session.download(name)
        except (client.StockadeError, ValueError) as exc:
            return _refused(exc)
        try:
            text, kind = raw.decode(), "utf8"
        except UnicodeDecodeError:
            text, kind = base64.b64encode(raw).decode(), "base64"
        return CallToolResult(content=[TextContent(text=text)], structured_content={
            "name": name, "content": text, "encoding": kind, "size": len(raw)})

    @_caller
    async def session_end(self, session_id: str, *, ctx: Context) -> CallToolResult:
        """End a session now (its processes and files are gone)."""
        try:
            await self._session(ctx, session_id).end()
        except client.StockadeError as exc:
            return _refused(exc)
        self._mine(ctx).pop(session_id, None)
        return CallToolResult(content=[TextContent(text=f"session {session_id} ended")])

    @_caller
    async def list_environments(self, *, ctx: Context) -> CallToolResult:
        """The environments a run may choose: each one's Python and packages."""
        try:
            listing = await self.runner.environments()
        except client.StockadeError as exc:
            return _refused(exc)
        lines = [f"{e.name}{' (default)' if e.default else ''}: Python {e.version}; "
                 f"{', '.join(p.name for p in e.packages) or 'the standard library only'}"
                 for e in listing.environments]
        return CallToolResult(content=[TextContent(text="\n".join(lines))],
                              structured_content=msgspec.to_builtins(listing))


def _unknown_info(session_id: str) -> client.SessionInfo:
    """A stand-in record for a session this connection did not open: the runner's answer
    to a call on it says whether it is the caller's."""
    limits = client.Limits(cpu_time_s=0, wall_time_s=0, memory_mib=0, processes=0,
                           output_kib=0, file_size_kib=0)
    return client.SessionInfo(id=session_id, state="idle", created_at="", expires_at="",
                              idle_timeout_s=0, ttl_s=0, cpu_total_s=0, limits=limits, calls=0,
                              cpu_time_s=0, memory_peak_kib=0)


TOOLS = ("run_python", "session_start", "session_run", "session_files", "session_end",
         "list_environments")


def build(url: str | None = None, key: str | None = None) -> tuple[MCPServer[Any], Tools]:
    """The MCP server: its tools on a client of the runner at `url`, with `key`."""
    tools = Tools(client.AsyncClient(url, key))

    @contextlib.asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            await tools.end_all()
            await tools.runner.close()

    server: MCPServer[Any] = MCPServer("stockade", version=__version__,
                                        instructions=INSTRUCTIONS, lifespan=lifespan,
                                        log_level="WARNING")
    for name in TOOLS:
        server.add_tool(getattr(tools, name), name=name)
    return server, tools


async def serve_stdio(url: str | None, key: str | None) -> None:
    server, _ = build(url, key)
    await server.run_stdio_async()


def http_app(url: str, *, allowed_hosts: Sequence[str], allowed_origins: Sequence[str],
             idle_timeout_s: float) -> Starlette:
    """Streamable HTTP at /mcp: each call to the runner carries its MCP request's own key
    and request id (the server has none of its own); Host and Origin are checked; an MCP
    session idle for `idle_timeout_s` ends, and the sessions it opened with it."""
    server, tools = build(url, key="")
    security = TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                         allowed_hosts=list(allowed_hosts),
                                         allowed_origins=list(allowed_origins))
    app = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security,
                                     session_idle_timeout=idle_timeout_s)
    # However an MCP session ends (DELETE, idle, crash), the SDK discards it here (the one
    # place; a private method of the pinned SDK, held to it by tests/test_mcp.py).
    manager = server.session_manager
    discard = manager._discard_session

    async def discard_and_end(session_id: str, transport: Any) -> None:
        try:
            await discard(session_id, transport)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(END_WITHIN_S):
                await tools.end_connection(session_id)

    manager._discard_session = discard_and_end  # type: ignore[method-assign]
    return app


async def serve_http(config: RunnerConfig, url: str) -> None:
    """Streamable HTTP on 127.0.0.1:`config.mcp_port`, for the runner at `url`: Host and
    Origin loopback's or the config's allowed ones, MCP sessions idle past the config's
    timeout ended."""
    app = http_app(url, allowed_hosts=[*LOOPBACK, *(f"{h}:*" for h in LOOPBACK),
                                       *config.allowed_hosts],
                   allowed_origins=[*(f"http://{h}:*" for h in LOOPBACK),
                                    *config.allowed_origins],
                   idle_timeout_s=config.mcp_idle_timeout_s)
    server = uvicorn.Config(app, host="127.0.0.1", port=config.mcp_port, log_level="warning",
                            timeout_graceful_shutdown=int(END_WITHIN_S), server_header=False)
    await uvicorn.Server(server).serve()
