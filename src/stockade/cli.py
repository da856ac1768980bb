"""`stockade` command line. Exit status: 0 ok, 1 the program failed or hit a limit,
2 usage error, 3 stockade itself failed (or the runner could not be reached)."""

from __future__ import annotations

import argparse
import base64
import grp
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

import stockade
from stockade import environment
from stockade import limits as limits_module
from stockade.environment import Environment
from stockade.limits import LimitError, LimitPolicy, LimitsIn
from stockade.result import Result, Status
from stockade.runner import config as runner_config
from stockade.runner import keys
from stockade.runner.config import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG
from stockade.runner.config import RunnerConfig
from stockade.runner.front.schema import FileIn, RunRequest
from stockade.runner.keys import SCOPES
from stockade.sandbox.client import Job, run
from stockade.sandbox.config import SandboxConfig
from stockade.sandbox.launcher import ZygoteError, ZygoteProcess

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
MAX_STDIN = 16 << 20
MAX_SOURCE = 4 << 20
MAX_INPUT_FILE = 16 << 20
KEY_ENV = "STOCKADE_API_KEY"  # an environment variable, so the key stays out of `ps`



class UsageError(Exception):
    """Bad input on the command line: one line to stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """FILE, the limit flags and --json: what `exec` and `run` share."""
    parser.add_argument("file", metavar="FILE", help="Python program to run")
    for field in limits_module.FIELDS:
        parser.add_argument(field.flag, dest=field.name, type=field.kind,
                            metavar=field.metavar, help=field.description)
    parser.add_argument("--json", action="store_true", help="print one result record as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stockade", description="Run untrusted code, confined.",
                     epilog="`stockade COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"stockade {stockade.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    ex = sub.add_parser("exec", help="run FILE once, confined, on this host (needs root)")
    _add_run_arguments(ex)
    ex.add_argument("--preload", default="", metavar="MODULES",
                    help="comma-separated modules to import before forking (e.g. numpy,pandas)")
    ex.add_argument("--uid", type=int, default=61000, help="unprivileged uid the run uses")

    sv = sub.add_parser("serve", help="serve the HTTP API with a warm container pool (root)")
    sv.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    sv.add_argument("--config", metavar="FILE", help=f"JSON config (default {DEFAULT_CONFIG})")
    sv.add_argument("--anonymous", action="store_true", help="serve callers without an API "
                    "key too (the config's `anonymous` quota, or the default one)")
    sv.add_argument("--external-front", action="store_true", help="do not fork the HTTP "
                    "front: wait for `stockade front` (its own systemd unit) at "
                    "RUN_DIR/front.sock")
    fr = sub.add_parser("front", help="the HTTP front as a service of its own (the runner "
                        "user, never root), for `stockade serve --external-front`")
    fr.add_argument("--socket", default=None, metavar="PATH",
                    help="the manager's socket (default /run/stockade/front.sock)")
    fr.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                    help="how long to wait for the manager to listen (default 120)")

    rn = sub.add_parser("run", help="run FILE on a stockade runner over HTTP",
                        description="Options go before FILE; what follows FILE is the "
                        "program's arguments. A piped stdin is the program's stdin.")
    _add_run_arguments(rn)
    rn.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG",
                    help="arguments for the program")
    rn.add_argument("--stdin", metavar="F", help="file whose content is the program's stdin "
                    "(default: stdin, when it is not a terminal)")
    rn.add_argument("-f", "--file", dest="files", action="append", default=[],
                    metavar="[NAME=]PATH", help="put PATH in the run's working directory "
                    "(as NAME); repeatable")
    rn.add_argument("-o", "--out", metavar="DIR",
                    help="save the files the program left under out/ to DIR")
    rn.add_argument("--url", default="http://127.0.0.1:8080", help="the runner's base URL")
    rn.add_argument("--stream", action="store_true", help="print the output as the program "
                    "writes it, not when it ends")
    rn.epilog = f"The API key, where the runner needs one, comes from ${KEY_ENV}."

    _add_session_parser(sub)

    dr = sub.add_parser("doctor", help="check that this host can serve (and build the image)")
    dr.add_argument("--serve-only", action="store_true",
                    help="skip what building the sandbox image needs (Packer, the template)")
    dr.add_argument("--listen", metavar="HOST:PORT", help="the address `serve` will listen on")
    dr.add_argument("--config", metavar="FILE", help=f"JSON config (default {DEFAULT_CONFIG})")

    _add_images_parser(sub)
    _add_keys_parser(sub)
    ck = sub.add_parser("check-config", help="validate a runner config file, print it in full")
    ck.add_argument("file", metavar="FILE")

    ng = sub.add_parser("nginx-config", help="print the nginx site config for a runner")
    ng.add_argument("--listen", default="80", help="nginx listen directive value (default 80)")
    ng.add_argument("--upstream", default="127.0.0.1:8080", help="the runner's HOST:PORT")
    ng.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=[],
                    metavar="CIDR", help="a balancer whose X-Forwarded-For names the client; "
                    "repeatable")
    ng.add_argument("--config", metavar="FILE", help=f"JSON config (default {DEFAULT_CONFIG})")
    return parser


def _add_session_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    se = sub.add_parser("session", help="an interactive Python session on a runner",
                        description="Each input is a cell run in one confined interpreter "
                        "that keeps its state; figures and tables are saved to files. "
                        "End of input ends the session.")
    for field in limits_module.FIELDS:
        se.add_argument(field.flag, dest=field.name, type=field.kind, metavar=field.metavar,
                        help=field.description + (" (per call)" if field.name in (
                            "cpu_time_s", "wall_time_s", "output_kib") else ""))
    se.add_argument("--idle-timeout", type=float, metavar="S",
                    help="end the session after this long without a call")
    se.add_argument("--ttl", type=float, metavar="S", help="end the session after this long")
    se.add_argument("--cpu-total", type=float, metavar="S",
                    help="CPU time for the session's whole life")
    se.add_argument("-f", "--file", dest="files", action="append", default=[],
                    metavar="[NAME=]PATH", help="put PATH in the session's working directory "
                    "(as NAME) before the first cell; repeatable")
    se.add_argument("-o", "--out", default=".", metavar="DIR",
                    help="where figures and tables are saved (default .)")
    se.add_argument("--url", default="http://127.0.0.1:8080", help="the runner's base URL")
    se.epilog = f"The API key, where the runner needs one, comes from ${KEY_ENV}."


def _add_keys_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    keys = sub.add_parser("keys", help="make, list and revoke API keys (root)",
                          description="Keys live in the config's keys_file; the runner "
                          "rereads it within a second of a change.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    add = keys_sub.add_parser("add", help="make a key and print it (the only time it is shown)")
    add.add_argument("name", metavar="NAME", help="who the key is for (a-z, 0-9, _ . -)")
    add.add_argument("--runs-per-minute", type=int, default=600, metavar="N",
                     help="sustained rate; a sixth of it may come at once (default 600)")
    add.add_argument("--concurrency", type=int, default=0, metavar="N",
                     help="runs at once (default: the pool's containers)")
    add.add_argument("--queue", type=int, default=0, metavar="N",
                     help="runs waiting at once (default: half the runner's wait queue)")
    add.add_argument("--sessions", type=int, default=0, metavar="N",
                     help="sessions alive at once (default: half the session pool, at least 1)")
    add.add_argument("--scope", dest="scopes", action="append", choices=SCOPES,
                     help="what the key may use: runs, metrics; repeatable (default runs)")
    for field in limits_module.FIELDS:
        add.add_argument(field.flag.replace("--", "--max-", 1), dest=f"max_{field.name}",
                         type=field.kind, metavar=field.metavar,
                         help=f"the key's cap on the {field.description}")
    listing = keys_sub.add_parser("list", help="the keys, their quotas, never their secrets")
    revoke = keys_sub.add_parser("revoke", help="remove a key; it stops working within 1 s")
    revoke.add_argument("name", metavar="NAME")
    for each in (add, listing, revoke):
        each.add_argument("--config", metavar="FILE",
                          help=f"JSON config (default {DEFAULT_CONFIG})")


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
    from stockade.runner import service  # noqa: PLC0415 - needs the runner extra

    config = _runner_config(args.config, args.listen)
    if args.anonymous and config.anonymous is None:
        config = msgspec.structs.replace(config, anonymous=keys.Quota())
    try:
        return service.serve(config, external_front=args.external_front)
    except service.ServiceError as exc:
        raise UsageError(str(exc)) from None


def cmd_front(args: argparse.Namespace) -> int:
    from stockade.runner import service  # noqa: PLC0415 - needs the runner extra

    if not 0 < args.wait <= 3600:
        raise UsageError("--wait wants seconds within (0, 3600]")
    try:
        return service.front(args.socket or service.DEFAULT_FRONT_SOCKET, args.wait)
    except service.ServiceError as exc:
        raise UsageError(str(exc)) from None


def _add_images_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    im = sub.add_parser("images", help="the environments' sandbox images: build, list, move, "
                        "collect (root, but for lock and stage)")
    im_sub = im.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    status = im_sub.add_parser("status", help="name each environment's image this code needs; "
                               "exit 0 if all are installed, 1 if not")
    listing = im_sub.add_parser("list", help="the images on this host: environment, Python, "
                                "packages, size, current, in use")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    lock = im_sub.add_parser("lock", help="resolve an environment's package set and write its "
                             "hash-locked requirements.lock")
    stage = im_sub.add_parser("stage", help="write what the Packer build puts in the rootfs")
    stage.add_argument("--output", required=True, metavar="DIR")
    rootfs = im_sub.add_parser("import-rootfs", help="install the rootfs Packer exported "
                               "unless the environment's image is current")
    rootfs.add_argument("tarball", metavar="ROOTFS_TAR_GZ")
    rootfs.add_argument("--force", action="store_true", help="reinstall even if current")
    for each in (lock, stage, rootfs):
        each.add_argument("--environment", required=True, metavar="NAME",
                          help="one of stockade/environments/")
    export = im_sub.add_parser("export", help="write environments' current images as "
                               "IMAGE.tar.gz, one path a line")
    export.add_argument("--output", default=".", metavar="DIR", help="directory (default .)")
    export.add_argument("--environment", action="append", metavar="NAME",
                        help="this one (repeatable; default: every environment served)")
    status.add_argument("--environment", action="append", metavar="NAME",
                        help="this one (repeatable; default: every environment served)")
    imp = im_sub.add_parser("import", help="install exported images unless current")
    imp.add_argument("archive", nargs="+", metavar="ARCHIVE", help="a file `images export` "
                     "wrote")
    gc = im_sub.add_parser("gc", help="remove images no environment needs and no container "
                           "is cloned from")
    for each in (status, listing, rootfs, export, imp, gc):
        each.add_argument("--config", metavar="FILE",
                          help=f"JSON config (default {DEFAULT_CONFIG})")


def cmd_images(args: argparse.Namespace) -> int:
    from stockade.runner.manager import images  # noqa: PLC0415 - needs the runner extra

    try:
        if args.images_command in ("lock", "stage"):
            env = environment.get(args.environment)
            if args.images_command == "lock":
                env.lock_path.write_text(environment.lock(env))
                print(env.lock_path)
            else:
                print(images.stage(env, Path(args.output)))
            return EXIT_OK
        config = _runner_config(args.config)
        return _images_command(args, config)
    except (images.ImageError, environment.DefinitionError) as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


def _images_command(args: argparse.Namespace, config: RunnerConfig) -> int:
    from stockade.runner.manager import images  # noqa: PLC0415 - needs the runner extra

    named = getattr(args, "environment", None)  # one name, several, or none: those served
    chosen = [environment.get(name) for name in
              ([named] if isinstance(named, str) else named or config.served)]
    if args.images_command == "status":
        missing = [env for env in chosen if not images.is_current(config, env)]
        for env in chosen:
            state = "is not installed" if env in missing else "is current"
            print(f"stockade: {env.name}: image {images.image_name(config, env)} {state}")
        return 1 if missing else EXIT_OK
    if args.images_command == "list":
        _list_images(images.installed(config), as_json=args.json)
        return EXIT_OK
    if os.geteuid() != 0:
        raise UsageError(f"images {args.images_command} needs root: container rootfs files "
                         "belong to the containers' uid range")
    if args.images_command == "export":
        for env in chosen:
            print(images.export(config, env, Path(args.output)))
    elif args.images_command == "gc":
        for name in images.prune(config):
            print(f"stockade: removed {name}")
    elif args.images_command == "import":
        for archive in args.archive:
            _say_installed(config, *images.import_archive(config, Path(archive)))
    else:
        _say_installed(config, chosen[0], images.import_rootfs(
            config, chosen[0], Path(args.tarball), force=args.force))
    return EXIT_OK


def _list_images(found: list[Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode(found) + b"\n")
        return
    print(f"{'IMAGE':<48} {'ENVIRONMENT':<18} {'PYTHON':<8} {'PKGS':>4} {'MIB':>7}  STATE")
    for i in found:
        state = ", ".join(s for s, on in (("current", i.current), ("in use", i.in_use))
                          if on) or "stale"
        print(f"{i.name:<48} {i.environment:<18} {i.python:<8} {i.packages:>4} "
              f"{i.size_mib:>7.1f}  {state}")


def _say_installed(config: RunnerConfig, env: Environment, changed: bool) -> None:
    """One line on stdout that tells a change from a no-op, for scripts and Ansible."""
    from stockade.runner.manager import images  # noqa: PLC0415 - needs the runner extra

    print(f"stockade: {env.name}: image {images.image_name(config, env)} "
          f"{'installed' if changed else 'is current'}")


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


def _write_through(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from stockade import remote  # noqa: PLC0415 - keeps `exec` light

    if args.stream and args.json:
        raise UsageError("--stream prints the output as it comes; --json prints one record "
                         "at the end: choose one")
    request = RunRequest(code=_read_source(args.file), stdin=_run_stdin(args.stdin),
                         args=list(args.args), files=[_input_file(f) for f in args.files],
                         limits=_requested_limits(args))
    try:
        result = remote.run(args.url, request, os.environ.get(KEY_ENV),
                            _write_through if args.stream else None)
        saved = remote.save_files(result.files, Path(args.out)) if args.out else []
    except remote.RemoteError as exc:
        if exc.usage:
            raise UsageError(str(exc)) from None
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except OSError as exc:
        raise UsageError(f"cannot save files to {args.out}: {exc.strerror}") from None
    _print(result, args.json, output=not args.stream)
    for path in saved:
        print(f"stockade: saved {path}", file=sys.stderr)
    return exit_status(result)


def cmd_session(args: argparse.Namespace) -> int:
    from stockade import remote, repl  # noqa: PLC0415 - keeps `exec` light
    from stockade.runner.front.schema import SessionRequest  # noqa: PLC0415

    request = SessionRequest(limits=_requested_limits(args), idle_timeout_s=args.idle_timeout,
                             ttl_s=args.ttl, cpu_total_s=args.cpu_total)
    try:
        return repl.main(remote.Runner(args.url, os.environ.get(KEY_ENV)), request,
                         Path(args.out), dict(_named_file(spec) for spec in args.files))
    except remote.RemoteError as exc:
        if exc.usage:
            raise UsageError(str(exc)) from None
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


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
            "session": cmd_session}


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
