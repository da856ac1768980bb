"""Messages between a client, the zygote and a run, with their size caps.

Every message is a typed msgspec struct decoded with a size cap; nothing is unpickled or
evaluated. Control messages travel over SOCK_SEQPACKET with file descriptors attached
(SCM_RIGHTS); the program, its stdin and its files travel in sealed memfds that only the
run reads, so the zygote never holds one run's data where the next run could find it.
"""

from __future__ import annotations

import os
import socket
from typing import Literal, TypeVar

import msgspec

from stockade.limits import Limits
from stockade.result import FileEntry, Outcome, RichOutput

MAX_MESSAGE = 64 * 1024
MAX_FILES = 64
MAX_FILE_NAME = 255
MAX_PATH_DEPTH = 8
MAX_ARGS = 256
MAX_ARG_LENGTH = 4096
CODE_FILE = "main.py"
OUT_DIR = "out"  # files the program leaves here come back with the result

# The order of the descriptors attached to a Start message: the first four go to the
# run's worker, the outbox (a memfd the client reads afterwards) to its out/ collector.
START_FDS = ("payload", "stdin", "stdout", "stderr", "outbox")
WORKER_FDS = START_FDS[:4]
OUTBOX_OVERHEAD = 64 * 1024  # names and framing, beyond the content cap


class ProtocolError(ValueError):
    """A peer sent something that does not fit the schema or its caps."""


class InputFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    content: bytes


class Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the run itself reads: the program, its arguments and its input files."""

    code: str
    args: list[str] = []
    files: list[InputFile] = []


class SessionTerms(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A run that lives across calls: its wall time is the session's life, its CPU time
    the session's total; each call's CPU is held to the budget its Probe sets."""

    ttl_s: float
    cpu_total_s: float


class Start(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="start"):
    limits: Limits
    session: SessionTerms | None = None


class Cancel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cancel"):
    reason: str = "cancelled"


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="probe"):
    """Client to zygote, while a session lives: answer with its Usage; with a budget, a
    call begins, whose CPU time from now on may not pass it."""

    cpu_budget_s: float | None = None


class Usage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="usage"):
    """The session's CPU time and memory so far, from its cgroup."""

    cpu_time_s: float
    memory_peak_kib: int


class Report(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="report"):
    outcome: Outcome


class Idle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="idle"):
    """Zygote to client, after each report: the run is proven gone (reaped, its cgroup
    empty) and the next may come. A zygote that cannot prove it exits instead."""


class Go(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="go"):
    """Zygote to a waiting run: start now, with these limits."""

    limits: Limits


class Workdir(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="workdir"):
    """A run's worker to its zygote, before it confines itself: its workdir (O_PATH)."""


class OutputFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    content: bytes


class OutboxContent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a run's collector found from out/: regular files only, within the caps."""

    files: list[OutputFile] = []
    truncated: bool = False  # some files were left out: too many, too large, or not regular


# -- a session's wire: the front and the session's driver, over the session's stdin -----
# Frames of a 4-byte big-endian length and a msgpack message. What the driver says is the
# session's own word (it runs the session's code): decoded typed, within the caps.

FRAME_HEADER = 4
FRAME_OVERHEAD = 64 * 1024  # names and framing, beyond the content caps


class Cell(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cell"):
    code: str
    stdin: str = ""


class FilePut(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="put"):
    path: str
    content: bytes


class FileGet(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="get"):
    path: str


class FileDelete(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="delete"):
    path: str


class FileList(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="list"):
    pass


class CellDone(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="done"):
    error: bool  # the cell raised (its traceback is on stderr)
    outputs: list[RichOutput] = []
    outputs_truncated: bool = False


class FileData(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="data"):
    content: bytes


class FileEntries(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="entries"):
    files: list[FileEntry]
    truncated: bool = False


class OpDone(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="ok"):
    pass


class OpFailed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="failed"):
    reason: Literal["not_found", "not_a_file", "too_large", "invalid"]
    message: str


SessionRequest = Cell | FilePut | FileGet | FileDelete | FileList
SessionAnswer = CellDone | FileData | FileEntries | OpDone | OpFailed
_session_request_decoder = msgspec.msgpack.Decoder(SessionRequest)
_session_answer_decoder = msgspec.msgpack.Decoder(SessionAnswer)


def frame(message: msgspec.Struct) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(FRAME_HEADER, "big") + body


class FrameReader:
    """Collects one frame from a stream, refusing one over `limit` bytes or a second one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> bytes | None:
        """The frame's body once it is whole, else None."""
        self.buffer += chunk
        if len(self.buffer) < FRAME_HEADER:
            return None
        size = int.from_bytes(self.buffer[:FRAME_HEADER], "big")
        if size > self.limit:
            raise ProtocolError(f"a frame of {size} bytes is over the {self.limit} cap")
        if len(self.buffer) < FRAME_HEADER + size:
            return None
        if len(self.buffer) > FRAME_HEADER + size:
            raise ProtocolError("more than one frame where one was due")
        return bytes(self.buffer[FRAME_HEADER:])


def decode_session_request(raw: bytes) -> SessionRequest:
    try:
        request: SessionRequest = _session_request_decoder.decode(raw)
        return request
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"invalid session request: {exc}") from None


def decode_session_answer(raw: bytes) -> SessionAnswer:
    try:
        answer: SessionAnswer = _session_answer_decoder.decode(raw)
        return answer
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"invalid answer from the session: {exc}") from None


ClientMessage = Start | Cancel | Probe
ZygoteMessage = Report | Idle | Usage
T = TypeVar("T")

_client_decoder = msgspec.json.Decoder(ClientMessage)
_zygote_decoder = msgspec.json.Decoder(ZygoteMessage)
_go_decoder = msgspec.json.Decoder(Go)
_payload_decoder = msgspec.msgpack.Decoder(Payload)
_outbox_decoder = msgspec.msgpack.Decoder(OutboxContent)
_workdir_decoder = msgspec.json.Decoder(Workdir)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    raw = _encoder.encode(message)
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE} byte cap")
    return raw


def _decode(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE} byte cap")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None


def decode_client(raw: bytes) -> ClientMessage:
    message: ClientMessage = _decode(_client_decoder, raw)
    return message


def decode_zygote(raw: bytes) -> ZygoteMessage:
    message: ZygoteMessage = _decode(_zygote_decoder, raw)
    return message


def decode_go(raw: bytes) -> Go:
    return _decode(_go_decoder, raw)


def encode_payload(payload: Payload) -> bytes:
    check_payload(payload)
    return msgspec.msgpack.encode(payload)


def decode_payload(raw: bytes) -> Payload:
    try:
        payload = _payload_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"invalid payload: {exc}") from None
    check_payload(payload)
    return payload


def decode_workdir(raw: bytes) -> Workdir:
    return _decode(_workdir_decoder, raw)


def decode_outbox(raw: bytes, max_files: int, max_bytes: int) -> OutboxContent:
    """Decode what crossed from a run, holding it to the same caps the collector had."""
    if len(raw) > max_bytes + OUTBOX_OVERHEAD:
        raise ProtocolError(f"output files of {len(raw)} bytes exceed the cap")
    try:
        outbox = _outbox_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"invalid output files: {exc}") from None
    if len(outbox.files) > max_files:
        raise ProtocolError(f"more than {max_files} output files")
    if sum(len(f.content) for f in outbox.files) > max_bytes:
        raise ProtocolError(f"output files over {max_bytes} bytes")
    check_file_names([f.name for f in outbox.files])
    return outbox


def check_file_name(name: str) -> None:
    """Refuse any name that could leave the working directory or collide with the program."""
    encoded = name.encode("utf-8", "surrogateescape")
    if not name or len(encoded) > MAX_FILE_NAME:
        raise ProtocolError(f"file name must be 1 to {MAX_FILE_NAME} bytes: {name!r}")
    parts = name.split("/")
    if (name.startswith("/") or "\0" in name or len(parts) > MAX_PATH_DEPTH
            or any(part in ("", ".", "..") for part in parts)):
        raise ProtocolError(f"file name must be a plain relative path without '..': {name!r}")
    if name == CODE_FILE:
        raise ProtocolError(f"file name {CODE_FILE!r} is reserved for the program")


def check_args(args: list[str]) -> None:
    if len(args) > MAX_ARGS or any(len(a) > MAX_ARG_LENGTH for a in args):
        raise ProtocolError(f"at most {MAX_ARGS} args of {MAX_ARG_LENGTH} characters each")


def check_payload(payload: Payload) -> None:
    check_args(payload.args)
    if len(payload.files) > MAX_FILES:
        raise ProtocolError(f"at most {MAX_FILES} files")
    check_file_names([f.name for f in payload.files])


def file_name_conflict(names: list[str]) -> tuple[int, str] | None:
    """The first name that collides with an earlier one, as (index, why): the same name,
    or a file where another needs a directory ('a' and 'a/b', in either order)."""
    files: set[str] = set()
    dirs: set[str] = set()
    for index, name in enumerate(names):
        parts = name.split("/")
        parents = {"/".join(parts[:depth]) for depth in range(1, len(parts))}
        if name in files:
            return index, f"duplicate file name {name!r}"
        if name in dirs:
            return index, f"{name!r} is a file, but another file needs it to be a directory"
        clash = sorted(parents & files)
        if clash:
            return index, f"{name!r} needs {clash[0]!r} to be a directory, but it is a file"
        files.add(name)
        dirs |= parents
    return None


def check_file_names(names: list[str]) -> None:
    for name in names:
        check_file_name(name)
    conflict = file_name_conflict(names)
    if conflict is not None:
        raise ProtocolError(conflict[1])


def send(sock: socket.socket, message: msgspec.Struct, fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [encode(message)], fds or [])


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """Receive one whole message; an oversized or truncated one is refused, its fds closed."""
    raw, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, max(max_fds, 1))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(raw) > MAX_MESSAGE or (
            len(fds) > max_fds):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message or descriptor list over the cap")
    return raw, fds
