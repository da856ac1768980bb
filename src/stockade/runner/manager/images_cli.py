"""`stockade images ...`: the environments' sandbox images, from the command line (root,
but for lock and stage). The arguments are parsed by `stockade.cli`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from stockade import environment
from stockade.cli_args import EXIT_INTERNAL, EXIT_OK, UsageError
from stockade.environment import Environment
from stockade.runner.config import RunnerConfig
from stockade.runner.manager import image_list, images


def run(args: argparse.Namespace, config: RunnerConfig | None) -> int:
    """`stockade images ...`; `config` is None for lock and stage, which need none."""
    try:
        if config is None:
            env = environment.get(args.environment)
            if args.images_command == "lock":
                env.lock_path.write_text(environment.lock(env))
                print(env.lock_path)
            else:
                print(images.stage(env, Path(args.output)))
            return EXIT_OK
        return _images_command(args, config)
    except (images.ImageError, environment.DefinitionError) as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


def _images_command(args: argparse.Namespace, config: RunnerConfig) -> int:
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
        _list_images(image_list.installed(config), as_json=args.json)
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
    print(f"stockade: {env.name}: image {images.image_name(config, env)} "
          f"{'installed' if changed else 'is current'}")
