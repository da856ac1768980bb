"""Talk to a zygote: hand it one run, read the run's output with caps, return the record.

The program, stdin and files go into sealed memfds; stdout and stderr come back on pipes
this side owns. Output past the cap is drained and dropped. Everything the zygote says is
decoded against the schema; a silent or broken zygote gives `internal_error`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stockade import protocol
from stockade.limits import Limits
from stockade.result import Outcome, OutFile, Result, Status, judge, signal_name

REPORT_GRACE_S = 5.0  # how long past the wall-time limit a zygote may take to answer
EOF_GRACE_S = 2.0  # how long output may keep flowing after the report
READ_CHUNK = 65536
# Called from the reading thread with each piece of output as it is read ("stdout" or
# "stderr", the bytes kept within the cap): what a streaming answer forwards.
OutputSink = Callable[[str, bytes], None]
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


@dataclass(frozen=True)
class Job:
    code: str
    stdin: bytes = b""
    args: list[str] = field(default_factory=list)
    files: list[protocol.InputFile] = field(default_factory=list)


class Capture:
    """Keeps the first `cap` bytes of a stream and counts the rest."""

    def __init__(self, cap: int, name: str = "") -> None:
        self.cap = cap
        self.name = name
        self.data = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> bytes:
        """Keep what fits; return the part kept (empty once the cap is reached)."""
        kept = chunk[:max(0, self.cap - len(self.data))]
        self.data += kept
        self.total += len(chunk)
        return kept

    @property
    def over(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def sealed_memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def internal_error(message: str) -> Result:
    return Result(status=Status.INTERNAL_ERROR, message=message)


@dataclass(frozen=True)
class OutputCaps:
    """What may come back from out/: the zygote's collector holds to the same caps."""

    max_files: int = 16
    max_bytes: int = 1 << 20


def run(sock: socket.socket, job: Job, limits: Limits,
        outputs: OutputCaps | None = None, sink: OutputSink | None = None) -> Result:
    """Run `job` on the zygote behind `sock` (one run at a time per socket); `sink`, if
    given, gets the output as it is read, within the same caps as the record."""
    outputs = outputs or OutputCaps()
    payload = protocol.encode_payload(protocol.Payload(job.code, job.args, job.files))
    # Only our ends are non-blocking: a program's writes block on a full pipe, as usual.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    sent = [out_w, err_w]
    outbox = os.memfd_create("outbox", os.MFD_CLOEXEC)
    try:
        sent += [sealed_memfd("payload", payload), sealed_memfd("stdin", job.stdin)]
        payload_fd, stdin_fd = sent[2], sent[3]
        protocol.send(sock, protocol.Start(limits),
                      [payload_fd, stdin_fd, out_w, err_w, outbox])
    except OSError as exc:
        for fd in (out_r, err_r, outbox):
            os.close(fd)
        return internal_error(f"cannot reach the sandbox: {exc}")
    finally:
        for fd in sent:
            os.close(fd)
    cap = limits.output_kib * 1024
    streams = {out_r: Capture(cap, "stdout"), err_r: Capture(cap, "stderr")}
    outcome = _collect(sock, streams, limits, sink)
    files, files_truncated = _output_files(outbox, outputs)
    return record(outcome, limits, streams[out_r], streams[err_r], files=files,
                  files_truncated=files_truncated)


def record(outcome: Outcome, limits: Limits, stdout: Capture, stderr: Capture,
           **fields: Any) -> Result:
    """The result record of what the zygote observed and the streams kept, judged against
    the limits; `fields` add to it or replace what the outcome says (a wall time)."""
    status, message = judge(outcome, limits, stdout.over or stderr.over)
    return Result(**{
        "status": status, "exit_code": outcome.exit_code,
        "signal": signal_name(outcome.signal) if outcome.signal is not None else None,
        "stdout": stdout.text(), "stderr": stderr.text(),
        "stdout_truncated": stdout.over, "stderr_truncated": stderr.over,
        "cpu_time_s": outcome.cpu_time_s, "wall_time_s": outcome.wall_time_s,
        "memory_peak_kib": outcome.memory_peak_kib, "message": message, **fields})


def read_stream(fd: int, capture: Capture, sink: OutputSink | None) -> bool:
    """One read of a stream into its capture, the kept part also to `sink`; False at its
    end. Raises BlockingIOError when nothing is there."""
    chunk = os.read(fd, READ_CHUNK)
    if not chunk:
        return False
    kept = capture.feed(chunk)
    if sink is not None and kept:
        sink(capture.name, kept)
    return True


def _output_files(outbox: int, caps: OutputCaps) -> tuple[list[OutFile], bool]:
    """Decode the outbox the run's collector filled, if any: typed, capped, names checked."""
    try:
        size = os.fstat(outbox).st_size
        if size == 0:
            return [], False
        if size > caps.max_bytes + protocol.OUTBOX_OVERHEAD:
            return [], True
        content = protocol.decode_outbox(os.pread(outbox, size, 0), caps.max_files,
                                         caps.max_bytes)
    except (OSError, protocol.ProtocolError):
        return [], True
    finally:
        os.close(outbox)
    files = []
    for item in content.files:
        try:
            files.append(OutFile(name=item.name, content=item.content.decode("utf-8")))
        except UnicodeDecodeError:
            files.append(OutFile(name=item.name, encoding="base64",
                                 content=base64.b64encode(item.content).decode()))
    return files, content.truncated


def _collect(sock: socket.socket, streams: dict[int, Capture], limits: Limits,
             sink: OutputSink | None = None) -> Outcome:
    """Drain both streams and wait for the report, each within its own bound."""
    deadline = time.monotonic() + limits.wall_time_s + REPORT_GRACE_S
    outcome: Outcome | None = None
    cancelled = False
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        try:
            while outcome is None or len(sel.get_map()) > 0:
                if outcome is not None and time.monotonic() > deadline:
                    break  # output that outlives its run is not worth waiting for
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return Outcome(error="the sandbox did not answer in time")
                for key, _ in sel.select(timeout):
                    if key.fileobj is sock:
                        outcome = _read_report(sock)
                        if outcome is not None:  # not the previous run's Idle
                            sel.unregister(sock)
                            deadline = time.monotonic() + EOF_GRACE_S
                        continue
                    capture = streams[key.fd]
                    if not read_stream(key.fd, capture, sink):
                        sel.unregister(key.fd)
                        continue
                    if capture.over and not cancelled and outcome is None:
                        cancelled = True
                        with contextlib.suppress(OSError):
                            protocol.send(sock, protocol.Cancel("output_limit"))
        finally:
            for fd in streams:
                os.close(fd)
    assert outcome is not None
    return outcome


def zygote_message(sock: socket.socket) -> protocol.Idle | protocol.Usage | Outcome:
    """The zygote's next message: a report as its outcome, and a zygote that is gone or
    says something that does not decode as an outcome that says so."""
    try:
        raw, _ = protocol.receive(sock)
    except (OSError, protocol.ProtocolError) as exc:
        return Outcome(error=f"unreadable answer from the sandbox: {exc}")
    if not raw:
        return Outcome(error="the sandbox closed the connection")
    try:
        message = protocol.decode_zygote(raw)
    except protocol.ProtocolError as exc:
        return Outcome(error=str(exc))
    return message.outcome if isinstance(message, protocol.Report) else message


def _read_report(sock: socket.socket) -> Outcome | None:
    """The run's outcome; None for an Idle left from the connection's previous run."""
    message = zygote_message(sock)
    if isinstance(message, protocol.Usage):
        return Outcome(error="the sandbox answered a probe no one sent")
    return None if isinstance(message, protocol.Idle) else message


def await_idle(sock: socket.socket, timeout_s: float) -> bool:
    """After a run's report: whether the zygote proved the run gone and takes the next
    within `timeout_s`. False if it hung up (it could not), said anything else, or is late."""
    try:
        sock.settimeout(timeout_s)
        raw, _ = protocol.receive(sock)
        return bool(raw) and isinstance(protocol.decode_zygote(raw), protocol.Idle)
    except (OSError, protocol.ProtocolError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
