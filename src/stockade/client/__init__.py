"""stockade's Python client, for programs and agents that run code on a runner: blocking
(`Client`) and asyncio (`AsyncClient`), with sessions, output streamed as it is written, and
files both ways. Errors are `StockadeError`s; a refusal is an `ApiError` with the API's code,
the field at fault and the request id.

It needs msgspec and httpx (`stockade[client]`), nothing of the server: it imports only the
API's shapes (`stockade.wire`), the result record and the limits. `stockade run` is made on
it, and so is `stockade session` (`repl.py`)."""

from stockade.client.aio import AsyncClient, AsyncRunStream, AsyncSession
from stockade.client.common import Output, file_bytes, forwarding, save_files
from stockade.client.errors import AnswerError, ApiError, StockadeError, TransportError
from stockade.client.sync import Client, RunStream, Session
from stockade.limits import Limits, LimitsIn
from stockade.result import FileEntry, OutFile, Result, RichOutput, Status
from stockade.wire import (
    CellResult,
    EnvironmentInfo,
    Environments,
    FileIn,
    Languages,
    SessionInfo,
)

__all__ = [
    "AnswerError",
    "ApiError",
    "AsyncClient",
    "AsyncRunStream",
    "AsyncSession",
    "CellResult",
    "Client",
    "EnvironmentInfo",
    "Environments",
    "FileEntry",
    "FileIn",
    "Languages",
    "Limits",
    "LimitsIn",
    "OutFile",
    "Output",
    "Result",
    "RichOutput",
    "RunStream",
    "Session",
    "SessionInfo",
    "Status",
    "StockadeError",
    "TransportError",
    "file_bytes",
    "forwarding",
    "save_files",
]
