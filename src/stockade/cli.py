"""`stockade` command line. Exit status: 0 ok, 1 the program failed or hit a limit,
2 usage error, 3 stockade itself failed (or the runner could not be reached)."""

from __future__ import annotations

import argparse
import base64
import grp
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from stockade import limits as limits_module
from stockade.cli_args import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_parser,
)
from stockade.limits import LimitError, LimitPolicy, LimitsIn
from stockade.result import Result, Status
from stockade.runner import config as runner_config
from stockade.runner import keys
from stockade.runner.config import RunnerConfig
from stockade.wire import FileIn

if TYPE_CHECKING:
    from stockade.client import Client

MAX_STDIN = 16 << 20
MAX_SOURCE = 4 << 20
MAX_INPUT_FILE = 16 << 20


def _read_capped(path: str, cap: int) -> bytes:
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(cap + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > cap:
        raise UsageError(f"{path} is larger than {cap >> 20} MiB")
    return raw


def _read_source(path: str) -> str:
    raw = _read_capped(path, MAX_SOURCE)
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


def _requested_limits(args: argparse.Namespace) -> LimitsIn:
    return LimitsIn(**{field.name: getattr(args, field.name) for field in limits_module.FIELDS})


def exit_status(result: Result) -> int:
    if result.status == Status.OK:
        return EXIT_OK
    return EXIT_INTERNAL if result.status == Status.INTERNAL_ERROR else EXIT_FAILED


def _print(result: Result, as_json: bool, output: bool = True) -> None:
    """The record as JSON, or as the program's own output (unless it was streamed already)
    and, when it did not end well, why."""
    if as_json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return
    if output:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    if result.status != Status.OK:
        print(f"stockade: {result.status}: {result.message}", file=sys.stderr)


def cmd_exec(args: argparse.Namespace) -> int:
    from stockade.launcher import ZygoteError, ZygoteProcess  # noqa: PLC0415 - root, local
    from stockade.runner.front.zygote_client import Job, run  # noqa: PLC0415
    from stockade.sandbox.config import SandboxConfig  # noqa: PLC0415

    policy = LimitPolicy()
    try:
        limits = policy.resolve(_requested_limits(args))
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


def _runner_config(path: str | None, listen: str | None = None) -> RunnerConfig:
    try:
        config = runner_config.load(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if listen is None:
        return config
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen wants HOST:PORT, got {listen!r}")
    return msgspec.structs.replace(config, host=host.strip("[]"), port=int(port))


def cmd_serve(args: argparse.Namespace) -> int:
    from stockade.runner.lifecycle import ServiceError  # noqa: PLC0415 - the runner extra
    from stockade.runner.manager import main as manager  # noqa: PLC0415

    config = _runner_config(args.config, args.listen)
    if args.anonymous and config.anonymous is None:
        config = msgspec.structs.replace(config, anonymous=keys.Quota())
    try:
        return manager.serve(config, external_front=args.external_front)
    except ServiceError as exc:
        raise UsageError(str(exc)) from None


def cmd_front(args: argparse.Namespace) -> int:
    from stockade.runner.front import main as front  # noqa: PLC0415 - the runner extra
    from stockade.runner.lifecycle import DEFAULT_FRONT_SOCKET, ServiceError  # noqa: PLC0415

    if not 0 < args.wait <= 3600:
        raise UsageError("--wait wants seconds within (0, 3600]")
    try:
        return front.front(args.socket or DEFAULT_FRONT_SOCKET, args.wait)
    except ServiceError as exc:
        raise UsageError(str(exc)) from None


def cmd_images(args: argparse.Namespace) -> int:
    from stockade.runner.manager import images_cli  # noqa: PLC0415 - needs the runner extra

    return images_cli.run(args, None if args.images_command in ("lock", "stage")
                          else _runner_config(args.config))


def cmd_keys(args: argparse.Namespace) -> int:
    config = _runner_config(args.config)
    path = Path(config.keys_file)
    try:
        group: int | None = grp.getgrnam(config.user).gr_gid
    except KeyError:
        group = None  # `serve` makes the user, then hands the file to its group
    try:
        if args.keys_command == "list":
            for record in keys.read(path).keys:
                print(keys.describe(record))
            return EXIT_OK
        if os.geteuid() != 0:
            raise UsageError(f"keys {args.keys_command} needs root: the key file is root's")
        if args.keys_command == "revoke":
            keys.revoke(path, args.name, group)
            print(f"stockade: revoked {args.name}", file=sys.stderr)
            return EXIT_OK
        quota = msgspec.convert({  # converted, so the quota's bounds are checked
            "runs_per_minute": args.runs_per_minute, "concurrency": args.concurrency,
            "queue": args.queue, "sessions": args.sessions, "scopes": args.scopes or ["runs"],
            "maximum": {f.name: getattr(args, f"max_{f.name}") for f in limits_module.FIELDS},
        }, keys.Quota)
        key = keys.add(path, args.name, quota, group)
    except (keys.KeyFileError, msgspec.ValidationError) as exc:
        raise UsageError(str(exc)) from None
    print(key)
    print(f"stockade: key {args.name} added to {path}; it is shown only now", file=sys.stderr)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _runner_config(args.file)
    try:
        cap = runner_config.pool_memory_cap_mib(config, runner_config.host_memory_mib())
    except ValueError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(config).decode()) + "\n")
    sys.stderr.write(f"the pool's memory cap on this host: {cap} MiB for "
                     f"{config.all_containers} containers of up to {config.container_memory_mib} "
                     "MiB each\n")
    return EXIT_OK


def cmd_nginx_config(args: argparse.Namespace) -> int:
    from stockade.runner.front import nginx  # noqa: PLC0415 - keeps `exec` light

    config = _runner_config(args.config)
    try:
        site = nginx.render(config, listen=args.listen, upstream=args.upstream,
                            trusted_proxies=args.trusted_proxies)
    except ValueError as exc:
        raise UsageError(f"--trusted-proxy: {exc}") from None
    sys.stdout.write(site)
    return EXIT_OK


def _named_file(spec: str) -> tuple[str, bytes]:
    """`[NAME=]PATH`: the name it gets (PATH's own, without NAME) and its content."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    return name, _read_capped(path, MAX_INPUT_FILE)


def _input_file(spec: str) -> FileIn:
    name, raw = _named_file(spec)
    try:
        return FileIn(name=name, content=raw.decode("utf-8"))
    except UnicodeDecodeError:
        return FileIn(name=name, content=base64.b64encode(raw).decode(), encoding="base64")


def _run_stdin(path: str | None) -> str:
    if path:
        return _read_source(path)
    if sys.stdin is None or sys.stdin.closed or sys.stdin.isatty():
        return ""
    try:
        return _read_stdin().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("stdin is not UTF-8 text") from None


def _remote(url: str, action: Callable[[Client], int]) -> int:
    """`action`, calls to the runner at `url` with the key in $STOCKADE_API_KEY (the
    client's default), with their failures as the CLI's: a refusal of the caller's input
    is a usage error (exit 2); any other failure, one line and exit 3."""
    try:
        from stockade import client  # noqa: PLC0415 - keeps `exec` light
    except ImportError as exc:
        raise UsageError(f"this command needs the client extra (pip install "
                         f"'stockade[client]'): {exc}") from None
    try:
        with client.Client(_runner_url(url)) as runner:
            return action(runner)
    except client.ApiError as exc:
        if 400 <= exc.status < 500:
            raise UsageError(f"refused: {exc}") from None
        print(f"stockade: refused: {exc}", file=sys.stderr)
    except client.StockadeError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
    return EXIT_INTERNAL


def _runner_url(url: str) -> str:
    """`url`, as the client checks a runner's URL; a bad one is a usage error."""
    from stockade.client import common  # noqa: PLC0415 - keeps `exec` light

    try:
        return common.where(url, None)[0]
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    if args.stream and args.json:
        raise UsageError("--stream prints the output as it comes; --json prints one record "
                         "at the end: choose one")
    code, stdin = _read_source(args.file), _run_stdin(args.stdin)
    files, limits = [_input_file(f) for f in args.files], _requested_limits(args)

    def run(runner: Client) -> int:
        from stockade import client  # noqa: PLC0415 - keeps `exec` light

        if args.stream:
            with runner.stream(code, stdin=stdin, args=args.args, files=files,
                               limits=limits) as stream:
                for output in stream:
                    target = sys.stdout if output.stream == "stdout" else sys.stderr
                    target.write(output.text)
                    target.flush()
                result = stream.result
        else:
            result = runner.run(code, stdin=stdin, args=args.args, files=files, limits=limits)
        try:
            saved = client.save_files(result.files, args.out) if args.out else []
        except OSError as exc:
            raise UsageError(f"cannot save files to {args.out}: {exc.strerror}") from None
        _print(result, args.json, output=not args.stream)
        for path in saved:
            print(f"stockade: saved {path}", file=sys.stderr)
        return exit_status(result)
    return _remote(args.url, run)


def cmd_session(args: argparse.Namespace) -> int:
    files = dict(_named_file(spec) for spec in args.files)

    def session(runner: Client) -> int:
        from stockade.client import repl  # noqa: PLC0415 - keeps `exec` light

        return repl.main(runner, Path(args.out), files, limits=_requested_limits(args),
                         idle_timeout_s=args.idle_timeout, ttl_s=args.ttl,
                         cpu_total_s=args.cpu_total)
    return _remote(args.url, session)


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        import asyncio  # noqa: PLC0415 - keeps `exec` light

        from stockade import mcp_server  # noqa: PLC0415 - needs the mcp extra
        from stockade.client import common  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(f"`stockade mcp` needs the mcp extra (pip install "
                         f"'stockade[mcp]'): {exc}") from None
    if not args.http:
        asyncio.run(mcp_server.serve_stdio(_runner_url(args.url or common.DEFAULT_URL),
                                           None))
        return EXIT_OK
    config = _runner_config(args.config)
    if not config.mcp_port:
        raise UsageError("--http serves on the config's mcp_port, which is 0 (none)")
    asyncio.run(mcp_server.serve_http(
        config, _runner_url(args.url or f"http://127.0.0.1:{config.port}")))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from stockade import doctor  # noqa: PLC0415 - imports the runner's config

    config = _runner_config(args.config, args.listen)
    checks = doctor.run_checks(config, build=not args.serve_only)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"stockade doctor: {len(failed)} of {len(checks)} checks failed", file=sys.stderr)
        return EXIT_FAILED
    print(f"stockade doctor: all {len(checks)} checks passed")
    return EXIT_OK


COMMANDS = {"exec": cmd_exec, "serve": cmd_serve, "front": cmd_front, "run": cmd_run,
            "images": cmd_images, "nginx-config": cmd_nginx_config,
            "check-config": cmd_check_config, "doctor": cmd_doctor, "keys": cmd_keys,
            "session": cmd_session, "mcp": cmd_mcp}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_USAGE
