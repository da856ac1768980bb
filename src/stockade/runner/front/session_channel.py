"""The front's side of one session, in a worker thread: start it on a leased container's
zygote, send it cells and file operations, read its output and answers within the caps,
and end it.

A session is one run that lives across calls: the zygote holds its life (ttl), total CPU,
memory and processes, and each call's CPU budget (a Probe); the front holds each call's
wall time (a Cancel) and output cap. Whatever the session says on its channel is decoded
typed and capped; a session that breaks the protocol is ended.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from dataclasses import dataclass, field

import msgspec

from stockade import protocol
from stockade.limits import Limits
from stockade.result import Outcome, Result, RichOutput, Status
from stockade.runner.front import zygote_client as client
from stockade.sandbox.session_driver import BOOT, Caps

ANSWER_GRACE_S = 5.0  # how long a file operation may take
END_GRACE_S = 10.0  # how long a cancelled session's zygote may take to report


class SessionEnded(Exception):
    """The session's process is gone; `result` says how it ended."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.message or result.status)
        self.result = result


@dataclass
class CallResult:
    """One cell's record (the result record's fields) and what it showed."""

    result: Result
    outputs: list[RichOutput] = field(default_factory=list)
    outputs_truncated: bool = False
    ended: bool = False  # the call ended the session


class SessionChannel:
    """One session on one zygote connection (which it owns until the session ends)."""

    def __init__(self, sock: socket.socket, limits: Limits, caps: Caps) -> None:
        self.sock = sock
        self.limits = limits
        self.caps = caps
        self.control: socket.socket | None = None
        self.out_r = self.err_r = -1
        self.terms = protocol.SessionTerms(0.0, 0.0)
        self.ended: Result | None = None
        self.total_spent = False  # the session ended for its total CPU time
        self.broken = ""  # how the session's program broke its channel, if it did
        self.cpu_used = 0.0
        self.memory_peak_kib = 0
        self.probes = 0  # Probes sent whose Usage has not been read
        self.before: protocol.Usage | None = None  # the current call's starting usage

    def open(self, terms: protocol.SessionTerms) -> None:
        """Start the session's run: the driver as its program, the control socket as its
        stdin. Raises SessionEnded if the zygote cannot be reached."""
        payload = protocol.encode_payload(protocol.Payload(BOOT, self.caps.args()))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        sent = [theirs.detach(), out_w, err_w]
        try:
            sent += [client.sealed_memfd("payload", payload),
                     os.memfd_create("outbox", os.MFD_CLOEXEC)]
            protocol.send(self.sock, protocol.Start(self.limits, session=terms),
                          [sent[3], sent[0], out_w, err_w, sent[4]])
        except OSError as exc:
            ours.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise SessionEnded(client.internal_error(f"cannot reach the sandbox: {exc}")) \
                from None
        finally:
            for fd in sent:
                os.close(fd)
        self.control, self.out_r, self.err_r = ours, out_r, err_r
        self.terms = terms

    # -- calls -----------------------------------------------------------------------------

    def call(self, cell: protocol.Cell, limits: Limits,
             sink: client.OutputSink | None = None) -> CallResult:
        """Run one cell within `limits` (CPU, wall time, output: this call's). A limit it
        hits ends the session, with that status."""
        started = time.monotonic()
        cap = limits.output_kib * 1024
        out, err = client.Capture(cap, "stdout"), client.Capture(cap, "stderr")
        # The call's CPU budget and its starting usage, asked for as the cell is sent,
        # not before it: the zygote answers a Probe it has read before any report, so a
        # report that comes first means the session had ended before this call began.
        self.before = None
        self._ask(limits.cpu_time_s)
        self._send(cell)
        deadline = started + limits.wall_time_s
        answer = self._await_answer(deadline, {self.out_r: out, self.err_r: err}, sink)
        while self.before is None and not isinstance(answer, Outcome):  # still owed
            message = self._zygote_message(time.monotonic() + ANSWER_GRACE_S)
            if isinstance(message, Outcome):
                answer = message
            else:
                self._on_usage(message)
        before = self.before
        if before is None:  # gone before this call began: nothing of it ran
            raise SessionEnded(self._end(answer, limits, out, err, started))
        if not isinstance(answer, Outcome | protocol.CellDone):
            answer = self._broken("it answered a cell with a file operation's answer")
        if isinstance(answer, Outcome):  # the session ended during the call
            return CallResult(self._end(self._share(answer, before), limits, out, err,
                                        started), ended=True)
        self._drain({self.out_r: out, self.err_r: err}, sink)
        after = self._probe(None)
        if isinstance(after, Outcome):
            return CallResult(self._end(self._share(after, before), limits, out, err,
                                        started), ended=True)
        result = Result(
            status=Status.RUNTIME_ERROR if answer.error else Status.OK,
            exit_code=1 if answer.error else 0, stdout=out.text(), stderr=err.text(),
            cpu_time_s=round(after.cpu_time_s - before.cpu_time_s, 6),
            wall_time_s=round(time.monotonic() - started, 6),
            memory_peak_kib=after.memory_peak_kib,
            message="the cell raised an exception (its traceback is on stderr)"
            if answer.error else "")
        return CallResult(result, answer.outputs, answer.outputs_truncated)

    def _share(self, outcome: Outcome, before: protocol.Usage) -> Outcome:
        """The session's final outcome as the record of the call it ended: the call's own
        CPU time; a kill for the session's total CPU said as such."""
        if outcome.error is not None:
            return outcome
        if outcome.cpu_time_s >= self.terms.cpu_total_s:
            self.total_spent = True
        return msgspec.structs.replace(
            outcome, cpu_time_s=round(max(0.0, outcome.cpu_time_s - before.cpu_time_s), 6))

    def file(self, request: protocol.SessionRequest) -> protocol.SessionAnswer:
        """A file operation; SessionEnded if the session is gone or breaks the protocol."""
        self._send(request)
        answer = self._await_answer(time.monotonic() + ANSWER_GRACE_S, {}, None)
        if isinstance(answer, protocol.CellDone):
            answer = self._broken("it answered a file operation with a cell's answer")
        if isinstance(answer, Outcome):
            raise SessionEnded(self._end(answer, self.limits, client.Capture(0),
                                         client.Capture(0), time.monotonic()))
        return answer

    def abandon(self) -> None:
        """Close this side without a word to the zygote (after a failure of stockade's
        own: the container is replaced, not asked)."""
        if self.ended is None:
            self.ended = client.internal_error("the session's channel failed")
        self._release()

    def cancel_soon(self) -> None:
        """From another thread, while a call is in progress: end the session; the call
        returns with how it ended."""
        self._cancel("cancelled")

    def close(self) -> Result:
        """End the session (if it has not ended) and release its descriptors."""
        if self.ended is None:
            self._cancel("cancelled")
            outcome = self._await_report(time.monotonic() + END_GRACE_S)
            whole_life = msgspec.structs.replace(self.limits,
                                                 cpu_time_s=self.terms.cpu_total_s)
            self._end(outcome, whole_life, client.Capture(0), client.Capture(0),
                      time.monotonic())
        assert self.ended is not None
        return self.ended

    # -- the wire ---------------------------------------------------------------------------

    def _send(self, request: protocol.SessionRequest) -> None:
        if self.ended is not None:
            raise SessionEnded(self.ended)
        assert self.control is not None
        with contextlib.suppress(OSError):  # the session is ending: its report says how
            self.control.sendall(protocol.frame(request))

    def _ask(self, budget: float | None) -> None:
        """Send a Probe; its Usage is read by `_usage` (or while awaiting an answer)."""
        if self.ended is not None:
            raise SessionEnded(self.ended)
        with contextlib.suppress(OSError):  # a zygote that is gone says so on reading
            protocol.send(self.sock, protocol.Probe(budget))
            self.probes += 1

    def _on_usage(self, usage: protocol.Usage) -> None:
        self.probes -= 1
        if self.before is None:
            self.before = usage
        self.cpu_used, self.memory_peak_kib = usage.cpu_time_s, usage.memory_peak_kib

    def _probe(self, budget: float | None) -> protocol.Usage | Outcome:
        """The zygote's Usage now (after any still owed); or, if the session has ended,
        its report."""
        self._ask(budget)
        while True:
            message = self._zygote_message(time.monotonic() + ANSWER_GRACE_S)
            if isinstance(message, Outcome):
                return message
            self._on_usage(message)
            if self.probes == 0:
                return message

    def _zygote_message(self, deadline: float) -> protocol.Usage | Outcome:
        try:
            self.sock.settimeout(max(0.0, deadline - time.monotonic()))
        except OSError as exc:
            return Outcome(error=f"the sandbox hung up: {exc}")
        try:
            message = client.zygote_message(self.sock)
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        if isinstance(message, protocol.Idle):
            return Outcome(error="the sandbox said idle while a session lived")
        return message

    def _await_report(self, deadline: float) -> Outcome:
        while True:
            message = self._zygote_message(deadline)
            if isinstance(message, Outcome):
                return message  # Usage answers to earlier probes are skipped

    def _await_answer(self, deadline: float, streams: dict[int, client.Capture],
                      sink: client.OutputSink | None) -> protocol.SessionAnswer | Outcome:
        """The session's next answer, feeding its output to `streams` meanwhile; or the
        zygote's report if the session ends first (at the deadline, it is cancelled)."""
        assert self.control is not None
        frames = protocol.FrameReader(self.caps.max_output_bytes + self.caps.max_file_bytes
                                      + protocol.FRAME_OVERHEAD)
        cancelled = False
        with selectors.DefaultSelector() as sel:
            sel.register(self.control, selectors.EVENT_READ, "control")
            sel.register(self.sock, selectors.EVENT_READ, "zygote")
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ, "stream")
            while True:
                if time.monotonic() >= deadline:
                    if cancelled:
                        return Outcome(error="the session did not end when it was cancelled")
                    self._cancel("wall_time_limit")
                    cancelled, deadline = True, time.monotonic() + END_GRACE_S
                for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                    if key.data == "zygote":
                        message = self._zygote_message(time.monotonic() + END_GRACE_S)
                        if isinstance(message, Outcome):
                            return message
                        self._on_usage(message)
                        continue
                    if key.data == "stream":
                        if _take(sel, key.fd, streams[key.fd], sink) and not cancelled:
                            self._cancel("output_limit")
                            cancelled, deadline = True, time.monotonic() + END_GRACE_S
                        continue
                    chunk = self._recv_control()
                    if not chunk:
                        sel.unregister(self.control)  # closed: its report is coming
                        continue
                    try:
                        body = frames.feed(chunk)
                        if body is not None and not cancelled:
                            return protocol.decode_session_answer(body)
                    except protocol.ProtocolError as exc:
                        return self._broken(str(exc))

    def _recv_control(self) -> bytes:
        """The session's next bytes; none once its end is gone (closed, or reset: it died
        with a request of ours unread). Its report says how it ended."""
        assert self.control is not None
        try:
            return self.control.recv(65536)
        except OSError:
            return b""

    def _cancel(self, reason: str) -> None:
        with contextlib.suppress(OSError):
            protocol.send(self.sock, protocol.Cancel(reason))

    def _broken(self, why: str) -> Outcome:
        """The session's program broke its channel (it wrote over it, say): it is ended."""
        self._cancel("cancelled")
        outcome = self._await_report(time.monotonic() + END_GRACE_S)
        self.broken = why
        return outcome

    def _drain(self, streams: dict[int, client.Capture],
               sink: client.OutputSink | None) -> None:
        """What the cell wrote before it answered is in the pipes already: take it."""
        for fd, capture in streams.items():
            with contextlib.suppress(BlockingIOError):
                while client.read_stream(fd, capture, sink):
                    pass

    def _end(self, outcome: Outcome, limits: Limits, out: client.Capture,
             err: client.Capture, started: float) -> Result:
        """The session is over: its record, its descriptors closed."""
        result = client.record(outcome, limits, out, err,
                               wall_time_s=round(time.monotonic() - started, 6))
        if self.total_spent and result.status == Status.TIME_LIMIT:
            result = msgspec.structs.replace(result, message=(
                f"the session's total CPU time of {self.terms.cpu_total_s:g} s is spent"))
        if self.broken and outcome.error is None:
            result = msgspec.structs.replace(
                result, status=Status.RUNTIME_ERROR,
                message=f"the session's program broke its channel to stockade: {self.broken}")
        if self.ended is None:
            self.ended = result
        self._release()
        return result

    def _release(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        for fd in (self.out_r, self.err_r):
            if fd >= 0:
                os.close(fd)
        self.out_r = self.err_r = -1


def _take(sel: selectors.BaseSelector, fd: int, capture: client.Capture,
          sink: client.OutputSink | None) -> bool:
    """Read a ready stream (unwatched at its end); True if it is now over its cap."""
    try:
        if not client.read_stream(fd, capture, sink):
            sel.unregister(fd)
    except BlockingIOError:
        return False
    return capture.over
