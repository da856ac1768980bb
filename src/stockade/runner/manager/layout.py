"""Where a pool container's parts are, inside it and on the host: each name once.

Inside, the zygote reads its config and serves its socket from one directory, the host
directory bind-mounted there: the container's only window to the host.
"""

from __future__ import annotations

from pathlib import Path

from stockade.runner.config import RunnerConfig

HOSTNAME = "sandbox"
CONTAINER_DIR = "/run/stockade"  # inside the container
SOCKET_NAME = "zygote.sock"
ZYGOTE_CONFIG_NAME = "zygote.json"
ZYGOTE_CONFIG = f"{CONTAINER_DIR}/{ZYGOTE_CONFIG_NAME}"
ZYGOTE_SOCKET = f"{CONTAINER_DIR}/{SOCKET_NAME}"
ZYGOTE_STATE_DIR = "/var/lib/stockade-zygote"  # inside: the zygote's own state
CONSOLE_LOG = "console.log"  # beside the container's config: the zygote's stderr


def host_dir(config: RunnerConfig, name: str) -> Path:
    """The host directory mounted at CONTAINER_DIR in container `name`."""
    return config.pool_socket_dir / name


def host_socket(config: RunnerConfig, name: str) -> Path:
    return host_dir(config, name) / SOCKET_NAME


def console_log(config: RunnerConfig, name: str) -> Path:
    return Path(config.lxc_path) / name / CONSOLE_LOG
