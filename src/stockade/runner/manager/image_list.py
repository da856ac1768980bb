"""What `stockade images list` shows of the images on this host: each one's environment,
Python, package count, size on disk, and whether it is current or in use."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from stockade.runner.config import RunnerConfig
from stockade.runner.manager import images


class Installed(msgspec.Struct, frozen=True):
    """An image on this host, as `stockade images list` shows it."""

    name: str
    environment: str
    python: str
    packages: int
    size_mib: float
    current: bool  # the one this stockade's environment needs
    in_use: bool  # some container is cloned from it


def installed(config: RunnerConfig) -> list[Installed]:
    current, used = images.current_names(config), images.in_use(config)
    found = []
    for directory in sorted(Path(config.lxc_path).glob(f"{config.image}-*")):
        stamp = images.read_stamp(directory)
        if stamp is None:
            continue
        found.append(Installed(directory.name, stamp.environment or "?", stamp.python,
                               len(stamp.packages), round(tree_size(directory) / 2**20, 1),
                               directory.name in current, directory.name in used))
    return found


def tree_size(top: Path) -> int:
    """Bytes a tree takes on disk (hard links counted once), links never followed."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
