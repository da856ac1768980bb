"""The command line's grammar: every command of `stockade` and its options (`cli.py`
carries them out). Limits' flags come from their one definition in `limits.py`."""

from __future__ import annotations

import argparse

import stockade
from stockade import limits as limits_module
from stockade.runner.config import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG
from stockade.runner.keys import SCOPES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3  # see cli.py's docstring
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
    mc = sub.add_parser("mcp", help="an MCP server for agents, on a runner",
                        description="Speaks the Model Context Protocol on stdin and stdout "
                        "(or with --http, at /mcp): tools to run Python once, and sessions "
                        "that keep state. The sessions a connection opens end with it.")
    mc.add_argument("--url", help="the runner's base URL (default: stdio, "
                    "http://127.0.0.1:8080; --http, the config's runner on loopback; on a "
                    "fleet, the balancer's, so that a session's calls reach its host)")
    mc.add_argument("--http", action="store_true", help="serve Streamable HTTP on "
                    "127.0.0.1:mcp_port for the config's runner and nginx, each call with "
                    "its caller's own key")
    mc.add_argument("--config", metavar="FILE", help=f"JSON config (default {DEFAULT_CONFIG})")
    mc.epilog = (f"Over stdio the API key, where the runner needs one, comes from ${KEY_ENV}; "
                 "over HTTP each request brings its own.")

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
