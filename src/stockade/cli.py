"""`stockade` command line. Exit status: 0 ok, 1 the program failed or hit a limit,
2 usage error, 3 stockade itself failed."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import msgspec

from stockade.limits import LimitError, LimitPolicy
from stockade.result import Result, Status
from stockade.sandbox.client import Job, run
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.launcher import ZygoteError, ZygoteProcess

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
MAX_STDIN = 16 << 20
MAX_SOURCE = 4 << 20

LIMIT_FLAGS = (
    ("--cpu-time", "cpu_time_s", float, "S", "CPU time limit in seconds"),
    ("--wall-time", "wall_time_s", float, "S", "wall-clock limit in seconds"),
    ("--memory", "memory_mib", int, "MIB", "memory limit in MiB"),
    ("--processes", "processes", int, "N", "process and thread limit"),
    ("--output", "output_kib", int, "KIB", "stdout and stderr cap in KiB, each"),
    ("--file-size", "file_size_kib", int, "KIB", "largest file the program may write, KiB"),
)


class UsageError(Exception):
    """Bad input on the command line: one line to stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stockade", description="Run untrusted code, confined.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser("exec", help="run FILE once, confined, on this host (needs root)")
    ex.add_argument("file", metavar="FILE", help="Python program to run")
    for flag, dest, kind, metavar, text in LIMIT_FLAGS:
        ex.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text)
    ex.add_argument("--json", action="store_true", help="print one result record as JSON")
    ex.add_argument("--preload", default="", metavar="MODULES",
                    help="comma-separated modules to import before forking (e.g. numpy,pandas)")
    ex.add_argument("--uid", type=int, default=61000, help="unprivileged uid the run uses")
    return parser


def _read_source(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_SOURCE:
        raise UsageError(f"{path} is larger than {MAX_SOURCE >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def _read_stdin() -> bytes:
    if sys.stdin is None or sys.stdin.closed:
        return b""
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise UsageError(f"stdin is larger than {MAX_STDIN >> 20} MiB")
    return data


def exit_status(result: Result) -> int:
    if result.status == Status.OK:
        return EXIT_OK
    return EXIT_INTERNAL if result.status == Status.INTERNAL_ERROR else EXIT_FAILED


def _print(result: Result, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.status != Status.OK:
        print(f"stockade: {result.status}: {result.message}", file=sys.stderr)


def cmd_exec(args: argparse.Namespace) -> int:
    requested = {dest: getattr(args, dest) for _, dest, *_ in LIMIT_FLAGS}
    policy = LimitPolicy()
    try:
        limits = policy.resolve(requested)
    except LimitError as exc:
        raise UsageError(exc.message) from None
    code = _read_source(args.file)
    if os.geteuid() != 0:
        raise UsageError("exec needs root: it creates namespaces, mounts and cgroups")
    stdin = _read_stdin()
    with tempfile.TemporaryDirectory(prefix="stockade-exec-") as state:
        config = SandboxConfig(
            socket_path=f"{state}/zygote.sock", state_dir=state, name=f"exec-{os.getpid()}",
            run_uid=args.uid, run_gid=args.uid, limits=policy,
            preload=[m for m in args.preload.split(",") if m])
        try:
            with ZygoteProcess(config) as zygote, zygote.connect() as sock:
                result = run(sock, Job(code=code, stdin=stdin), limits)
        except (ZygoteError, OSError) as exc:
            result = Result(status=Status.INTERNAL_ERROR, message=str(exc))
    _print(result, args.json)
    return exit_status(result)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "exec":
            return cmd_exec(args)
    except UsageError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE
