"""The cgroups LXC makes for containers, and the ones it leaves behind.

Root only. The LXC bindings leave every started container's empty lxc.monitor.<name>
cgroup in each hierarchy, and leave their caller inside it: these functions find them,
move the caller home and remove them, so nothing accumulates across restarts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from stockade.sandbox.cgroups import MOUNTINFO, parse_mountinfo


def cgroup_version() -> int:
    _, v1 = parse_mountinfo(Path(MOUNTINFO).read_text())
    return 1 if "memory" in v1 else 2


def reap_zombies(keep: set[int]) -> None:
    """Reap exited LXC monitors: they stay our children, and a zombie keeps its
    lxc.monitor cgroup busy until it is reaped."""
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            if pid in keep:
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def cgroup_dirs(pid: str = "self") -> list[Path]:
    """The cgroup directories of process `pid`, one per hierarchy."""
    unified, v1 = parse_mountinfo(Path(MOUNTINFO).read_text())
    dirs: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and unified is not None:
            dirs.append(unified / path.lstrip("/"))
            continue
        for controller in controllers.split(","):
            mount = v1.get(controller) or _v1_mount(controller)
            if mount is not None:
                dirs.append(mount / path.lstrip("/"))
                break
    return list(dict.fromkeys(dirs))


def _lxc_cgroup_parents() -> list[Path]:
    """Where LXC makes a container's cgroups: beside init's cgroup (its default) or the
    caller's, in every hierarchy."""
    return list(dict.fromkeys([*cgroup_dirs("1"), *cgroup_dirs()]))


def return_home(home: list[Path]) -> None:
    """Move this process back to its own cgroups. Starting a container through the LXC
    bindings leaves the caller inside the new lxc.monitor.* cgroup, which then can never be
    removed while we live."""
    for directory in home:
        with contextlib.suppress(OSError):
            (directory / "cgroup.procs").write_text(str(os.getpid()))


def _v1_mount(controller: str) -> Path | None:
    candidate = Path("/sys/fs/cgroup") / controller.removeprefix("name=")
    return candidate if candidate.is_dir() else None


def remove_lxc_cgroups(name: str, prefix: bool = False, timeout_s: float = 0.0,
                       between: Callable[[], None] | None = None) -> list[str]:
    """Remove the lxc.monitor.NAME* and lxc.payload.NAME* cgroups, waiting up to `timeout_s`
    for a monitor that is still exiting (`between` runs before each try); return the busy."""
    deadline = time.monotonic() + timeout_s
    parents = [p for p in _lxc_cgroup_parents() if p.is_dir()]
    while True:
        if between is not None:
            between()
        busy = _remove_lxc_cgroups_once(parents, name, prefix)
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.02)


def _remove_lxc_cgroups_once(parents: list[Path], name: str, prefix: bool) -> list[str]:
    busy = []
    for parent in parents:
        for child in parent.iterdir():
            for kind in ("lxc.monitor.", "lxc.payload."):
                rest = child.name.removeprefix(kind)
                if rest == child.name or not child.is_dir():
                    continue
                # LXC adds "-1", "-2"... when a cgroup of the same name is still there.
                ours = rest.startswith(name) if prefix else (
                    rest == name or rest.startswith(f"{name}-"))
                if ours and not _remove_cgroup_tree(child):
                    busy.append(str(child))
    return busy


def _remove_cgroup_tree(path: Path) -> bool:
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup_tree(child)
    try:
        path.rmdir()
    except OSError:
        return False
    return True
