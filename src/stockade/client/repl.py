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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from stockade.client.errors import StockadeError
from stockade.client.sync import Client, Session
from stockade.limits import LimitsIn
from stockade.wire import CellResult

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
    def __init__(self, session: Session, out_dir: Path, out: TextIO, err: TextIO) -> None:
        self.session = session
        self.out_dir = out_dir
        self.out = out
        self.err = err
        self.saved = 0

    def run(self, code: str) -> CellResult:
        with self.session.stream(code) as stream:
            for output in stream:
                target = self.out if output.stream == "stdout" else self.err
                target.write(output.text)
                target.flush()
            result = stream.result
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


def main(runner: Client, out_dir: Path, files: dict[str, bytes], *, limits: LimitsIn | None,
         idle_timeout_s: float | None, ttl_s: float | None, cpu_total_s: float | None) -> int:
    """The REPL's exit status: 0 when the input ended, 1 when the session was lost. A
    failure to start it is the caller's (StockadeError)."""
    session = runner.session(limits=limits, idle_timeout_s=idle_timeout_s, ttl_s=ttl_s,
                             cpu_total_s=cpu_total_s, files=dict(files))
    repl = Repl(session, out_dir, sys.stdout, sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401, PLC0415 - line editing and history for input()

        print(f"stockade session {session.id} (ends after {session.info.idle_timeout_s:g} s "
              "idle; Ctrl-D ends it)", file=sys.stderr)
    try:
        for code in cells(input if interactive else _line_reader(sys.stdin), interactive):
            result = repl.run(code)
            if result.session_ended:
                return 1
    except KeyboardInterrupt:
        print("\nstockade: interrupted: the session is ended", file=sys.stderr)
        _end(session)
        return 130
    except StockadeError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return 1
    _end(session)
    return 0


def _end(session: Session) -> None:
    with contextlib.suppress(StockadeError):  # unreachable: it ends at its idle timeout
        session.end()


def _line_reader(stream: TextIO) -> Callable[[str], str]:
    def read(_prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return read
