"""`stockade session`: an interactive session against a runner, like Python's own REPL.

Each complete input (a statement, or a block ended by an empty line) is one cell: its
output is printed as the program writes it, the value of its last expression as Python's
REPL would print it, and figures and tables are saved to files (PNG, HTML). End of input
ends the session; Ctrl-C at the prompt drops the input, during a cell it ends the session
(a cell cannot be interrupted without ending its interpreter)."""

from __future__ import annotations

import base64
import codeop
import contextlib
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from stockade.client import remote
from stockade.wire import (
    CellRequest,
    CellResult,
    SessionInfo,
    SessionRequest,
)

EXTENSIONS = {"image/png": "png", "text/html": "html"}


def cells(read_line: Callable[[str], str], interactive: bool) -> Iterator[str]:
    """Complete inputs, as Python's REPL gathers them: a block needs an empty line."""
    lines: list[str] = []
    while True:
        try:
            line = read_line("... " if lines else ">>> " if interactive else "")
        except KeyboardInterrupt:
            print("\nKeyboardInterrupt (input dropped)", file=sys.stderr)
            lines = []
            continue
        except EOFError:
            if lines:
                yield "\n".join(lines)
            return
        lines.append(line)
        source = "\n".join(lines)
        try:
            complete = codeop.compile_command(source, "<cell>", "exec") is not None
        except (SyntaxError, ValueError, OverflowError):
            complete = True  # the runner says what is wrong with it
        if complete and (len(lines) == 1 or line == ""):
            if source.strip():
                yield source
            lines = []


class Repl:
    def __init__(self, runner: remote.Runner, out_dir: Path, out: TextIO, err: TextIO) -> None:
        self.runner = runner
        self.out_dir = out_dir
        self.out = out
        self.err = err
        self.saved = 0

    def _write(self, stream: str, text: str) -> None:
        target = self.out if stream == "stdout" else self.err
        target.write(text)
        target.flush()

    def start(self, request: SessionRequest, files: dict[str, bytes]) -> SessionInfo:
        """A new session, with `files` (name: content) in its working directory."""
        session = self.runner.call("POST", "/v1/sessions", request, SessionInfo)
        try:
            for name, content in files.items():
                self.runner.call("PUT", f"/v1/sessions/{session.id}/files/"
                                 f"{urllib.parse.quote(name)}", content, type(None))
        except remote.RemoteError:
            self.end(session)
            raise
        return session

    def run(self, session: SessionInfo, code: str) -> CellResult:
        result = self.runner.call("POST", f"/v1/sessions/{session.id}/runs",
                                  CellRequest(code), CellResult, self._write)
        self.show(result)
        return result

    def show(self, result: CellResult) -> None:
        for output in result.outputs:
            if output.mime == "text/plain":
                print(output.data, file=self.out)
            else:
                path = self._save(output.mime, output.data, output.encoding)
                print(f"[{output.mime} saved to {path}]", file=self.out)
        if result.outputs_truncated:
            print("stockade: some outputs were left out (over the runner's cap)", file=self.err)
        if result.status not in ("ok", "runtime_error") or result.session_ended:
            print(f"stockade: {result.status}: {result.message}", file=self.err)
        self.out.flush()

    def _save(self, mime: str, data: str, encoding: str) -> Path:
        self.saved += 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"stockade-output-{self.saved}.{EXTENSIONS[mime]}"
        path.write_bytes(base64.b64decode(data) if encoding == "base64" else data.encode())
        return path

    def end(self, session: SessionInfo) -> None:
        with contextlib.suppress(remote.RemoteError):  # gone already: it ends either way
            self.runner.call("DELETE", f"/v1/sessions/{session.id}", None, type(None))


def main(runner: remote.Runner, request: SessionRequest, out_dir: Path,
         files: dict[str, bytes]) -> int:
    """The REPL's exit status: 0 when the input ended, 1 when the session was lost."""
    repl = Repl(runner, out_dir, sys.stdout, sys.stderr)
    session = repl.start(request, files)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401, PLC0415 - line editing and history for input()

        print(f"stockade session {session.id} (ends after {session.idle_timeout_s:g} s idle; "
              "Ctrl-D ends it)", file=sys.stderr)
    try:
        for code in cells(input if interactive else _line_reader(sys.stdin), interactive):
            result = repl.run(session, code)
            if result.session_ended:
                return 1
    except KeyboardInterrupt:
        print("\nstockade: interrupted: the session is ended", file=sys.stderr)
        repl.end(session)
        return 130
    except remote.RemoteError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return 1
    repl.end(session)
    return 0


def _line_reader(stream: TextIO) -> Callable[[str], str]:
    def read(_prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return read
