"""A session's driver: the program a session's run executes, confined like any run.

It keeps one namespace alive and runs each cell the front sends in it, like a notebook
kernel: names, imports and open files persist between cells. It shows the value of a
cell's last expression (and whatever `display(obj)` is given) as rich outputs: the repr,
a table's HTML, a figure's PNG. It also reads and writes the session's files.

Its channel to the front is the session's stdin (a socket), moved off fd 0 before any
cell runs. It runs with the session's code in one process, so nothing it says is trusted:
the front decodes it typed and capped, and a session that lies only hurts itself. The
zygote imports this module before it forks, so a run can import it without any file.
"""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import io
import linecache
import os
import socket
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stockade import protocol
from stockade.result import FileEntry, RichOutput
from stockade.sandbox.config import WORKDIR

# The program a session's run executes: the driver, with its caps as arguments.
BOOT = "from stockade.sandbox.session_driver import main\nmain()\n"
MAX_LISTED = 1000


@dataclass(frozen=True)
class Caps:
    """What one cell may show, and the largest file the front may ask for."""

    max_outputs: int = 16
    max_output_bytes: int = 4 << 20
    max_file_bytes: int = 1 << 20

    def args(self) -> list[str]:
        return [str(self.max_outputs), str(self.max_output_bytes), str(self.max_file_bytes)]

    @classmethod
    def from_args(cls, args: list[str]) -> Caps:
        return cls(*(int(a) for a in args[:3]))


@dataclass
class Shown:
    """The rich outputs of the current cell, within the caps."""

    caps: Caps
    outputs: list[RichOutput] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def add(self, mime: str, data: str, encoding: str = "utf8") -> None:
        if len(self.outputs) >= self.caps.max_outputs or (
                self.size + len(data) > self.caps.max_output_bytes):
            self.truncated = True
            return
        self.outputs.append(RichOutput(mime, data, encoding))  # type: ignore[arg-type]
        self.size += len(data)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def show(shown: Shown, value: Any) -> None:
    """`value` as Jupyter would show it: its repr, then its HTML and PNG forms if any."""
    shown.add("text/plain", repr(value))
    figures = sys.modules.get("matplotlib.figure")
    if figures is not None and isinstance(value, figures.Figure):
        shown.add("image/png", _png(value), "base64")
        return
    html = getattr(value, "_repr_html_", None)
    if callable(html) and not isinstance(value, type):
        text = html()
        if isinstance(text, str):
            shown.add("text/html", text)
    png = getattr(value, "_repr_png_", None)
    if callable(png) and not isinstance(value, type):
        data = png()
        if isinstance(data, bytes):
            shown.add("image/png", base64.b64encode(data).decode(), "base64")


def _show_open_figures(shown: Shown) -> None:
    """Figures a cell drew with pyplot and did not show: as a notebook's inline backend."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        shown.add("image/png", _png(pyplot.figure(number)), "base64")
    pyplot.close("all")


class Kernel:
    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.pid = os.getpid()
        self.count = 0
        self.shown = Shown(caps)
        self.module = types.ModuleType("__main__")
        self.module.__dict__.update(__builtins__=builtins, display=self.display)
        sys.modules["__main__"] = self.module
        sys.displayhook = self._displayhook

    def display(self, *values: Any) -> None:
        """Show each value now, as the value of a cell's last expression is shown."""
        for value in values:
            show(self.shown, value)

    def run_cell(self, cell: protocol.Cell) -> protocol.CellDone:
        self.count += 1
        self.shown = Shown(self.caps)
        sys.stdin = io.StringIO(cell.stdin)
        error = False
        try:
            self._execute(cell.code, f"<cell {self.count}>")
        except SystemExit:
            raise  # the session's program ends: so does the session
        except BaseException as exc:
            error = True
            tb = exc.__traceback__  # from the cell's own frames on, as a notebook shows it
            while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
                tb = tb.tb_next
            traceback.print_exception(type(exc), exc.with_traceback(tb), tb)
        if os.getpid() != self.pid:  # a process the cell forked: it never reaches the channel
            _flush()
            os._exit(1 if error else 0)
        try:
            _show_open_figures(self.shown)
        except Exception:
            traceback.print_exc()
        _flush()
        return protocol.CellDone(error, self.shown.outputs, self.shown.truncated)

    def _execute(self, code: str, name: str) -> None:
        """Run the cell; its last statement, if an expression, as Python's REPL runs one
        (mode "single"), whose value goes to sys.displayhook: shown, as a notebook does."""
        # Tracebacks quote the cell's lines, as they would a file's.
        linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
        tree = ast.parse(code, name)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        namespace = self.module.__dict__
        exec(compile(tree, name, "exec"), namespace)  # noqa: S102 - the point
        if last is not None:
            exec(compile(ast.Interactive([last]), name, "single"), namespace)  # noqa: S102

    def _displayhook(self, value: object) -> None:
        if value is not None:
            show(self.shown, value)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


# -- files ---------------------------------------------------------------------------------

def _path(name: str) -> str:
    return os.path.join(WORKDIR, name)


def file_op(request: protocol.SessionRequest, caps: Caps) -> protocol.SessionAnswer:
    """A file operation in the session's working directory (names were checked by the
    front). Never through a link: the last part is opened with O_NOFOLLOW."""
    try:
        if isinstance(request, protocol.FilePut):
            parent = os.path.dirname(request.path)
            if parent:
                os.makedirs(_path(parent), mode=0o755, exist_ok=True)
            fd = os.open(_path(request.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(request.content)
            return protocol.OpDone()
        if isinstance(request, protocol.FileGet):
            if not _is_file(os.lstat(_path(request.path)).st_mode):
                return protocol.OpFailed("not_a_file", f"{request.path} is not a file")
            fd = os.open(_path(request.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > caps.max_file_bytes:
                    return protocol.OpFailed("too_large", f"{request.path} is over the "
                                             f"{caps.max_file_bytes >> 10} KiB cap")
                return protocol.FileData(handle.read(caps.max_file_bytes + 1)[
                    :caps.max_file_bytes])
        if isinstance(request, protocol.FileDelete):
            if not _is_file(os.lstat(_path(request.path)).st_mode):
                return protocol.OpFailed("not_a_file", f"{request.path} is not a file")
            os.unlink(_path(request.path))
            return protocol.OpDone()
        return _listing()
    except FileNotFoundError:
        return protocol.OpFailed("not_found", f"no file {getattr(request, 'path', '')}")
    except OSError as exc:
        return protocol.OpFailed("invalid", f"{getattr(request, 'path', '')}: {exc.strerror}")


def _is_file(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def _listing() -> protocol.FileEntries:
    files: list[FileEntry] = []
    for entry in _walk(WORKDIR, ""):
        if len(files) == MAX_LISTED:
            return protocol.FileEntries(files, truncated=True)
        files.append(entry)
    return protocol.FileEntries(files)


def _walk(directory: str, prefix: str) -> Iterator[FileEntry]:
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path, f"{name}/")
            elif entry.is_file(follow_symlinks=False) and name != protocol.CODE_FILE:
                yield FileEntry(name, entry.stat(follow_symlinks=False).st_size)


# -- the loop ------------------------------------------------------------------------------

def _read_exactly(channel: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            _flush()
            os._exit(0)  # the front closed the session
        data += chunk
    return bytes(data)


def _take_channel() -> socket.socket:
    """The front's socket, off fd 0; fd 0 becomes /dev/null (each cell has its stdin)."""
    channel = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return channel


def main() -> None:
    caps = Caps.from_args(sys.argv[1:])
    channel = _take_channel()
    kernel = Kernel(caps)
    while True:
        size = int.from_bytes(_read_exactly(channel, protocol.FRAME_HEADER), "big")
        request = protocol.decode_session_request(_read_exactly(channel, size))
        if isinstance(request, protocol.Cell):
            answer: protocol.SessionAnswer = kernel.run_cell(request)
        else:
            answer = file_op(request, caps)
        channel.sendall(protocol.frame(answer))
