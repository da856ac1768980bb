"""Messages between a client, the zygote and a run, with their size caps.

Every message is a typed msgspec struct decoded with a size cap; nothing is unpickled or
evaluated. Control messages travel over SOCK_SEQPACKET with file descriptors attached
(SCM_RIGHTS); the program, its stdin and its files travel in sealed memfds that only the
run reads, so the zygote never holds one run's data where the next run could find it.
"""

from __future__ import annotations

import os
import socket
from typing import TypeVar

import msgspec

from stockade.limits import Limits
from stockade.result import Outcome

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


class Start(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="start"):
    limits: Limits


class Cancel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cancel"):
    reason: str = "cancelled"


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


ClientMessage = Start | Cancel
ZygoteMessage = Report | Idle
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
