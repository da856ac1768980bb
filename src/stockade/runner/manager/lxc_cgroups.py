"""The cgroups LXC makes for containers, the pool's parent above them, and what LXC leaves.

Root only. Every container of a pool is created in `<pool>/<name>` and its LXC monitor in
`<pool>.monitor/<name>` (`lxc.cgroup.dir.*`), where `<pool>` is the container prefix: the
pool's parent cgroup carries a memory cap that bounds all its containers together. The LXC
bindings leave the caller inside the monitor's cgroup and the monitor's cgroups behind:
these functions move the caller home and remove them, so nothing accumulates across
restarts (older runners' `lxc.monitor.*`/`lxc.payload.*` cgroups included).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from stockade.sandbox.cgroups import (
    MOUNTINFO,
    V2_CONTROLLERS,
    CgroupError,
    parse_mountinfo,
    write_value,
)


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


def pool_cgroup(prefix: str) -> str:
    """The parent cgroup of a pool's containers (its monitors': this + ".monitor")."""
    return prefix.rstrip("-.") or "stockade"


def lxc_cgroup_items(prefix: str, name: str) -> list[tuple[str, str]]:
    """The LXC config that puts a container under its pool's parent cgroup."""
    pool = pool_cgroup(prefix)
    return [("lxc.cgroup.dir.container", f"{pool}/{name}"),
            ("lxc.cgroup.dir.monitor", f"{pool}.monitor/{name}"),
            ("lxc.cgroup.dir.monitor.pivot", f"{pool}.monitor")]


def lxc_bases() -> list[Path]:
    """Where LXC, run by root, roots the paths of `lxc.cgroup.dir.*`: init's cgroup in every
    hierarchy, less systemd's init.scope (LXC prunes it too)."""
    return [d.parent if d.name == "init.scope" else d for d in cgroup_dirs("1")]


def make_pool_cgroup(prefix: str, memory_bytes: int) -> Path:
    """Create the pool's parent cgroup with its memory cap (no swap beyond it); the
    directory that holds the cap. On v2, the controllers the containers' caps need are
    enabled for its children."""
    pool = pool_cgroup(prefix)
    unified, v1 = parse_mountinfo(Path(MOUNTINFO).read_text())
    if "memory" in v1:
        base = next((d for d in lxc_bases() if d.is_relative_to(v1["memory"])), v1["memory"])
        parent = base / pool
        parent.mkdir(exist_ok=True)
        write_value(parent / "memory.limit_in_bytes", str(memory_bytes))
        if (parent / "memory.memsw.limit_in_bytes").exists():
            write_value(parent / "memory.memsw.limit_in_bytes", str(memory_bytes))
        return parent
    if unified is None:
        raise CgroupError("no memory cgroup hierarchy is mounted")
    base = next((d for d in lxc_bases() if d.is_relative_to(unified)), unified)
    wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
    write_value(base / "cgroup.subtree_control", wanted)
    parent = base / pool
    parent.mkdir(exist_ok=True)
    write_value(parent / "memory.max", str(memory_bytes))
    if (parent / "memory.swap.max").exists():
        write_value(parent / "memory.swap.max", "0")
    write_value(parent / "cgroup.subtree_control", wanted)
    return parent


def remove_pool_cgroup(prefix: str) -> list[str]:
    """Remove the pool's parent and monitor cgroups (with LXC's pivot) where they are
    empty of processes; the ones still busy."""
    pool = pool_cgroup(prefix)
    busy = []
    for base in lxc_bases():
        for path in (base / f"{pool}.monitor", base / pool):
            if path.is_dir() and not _remove_cgroup_tree(path):
                busy.append(str(path))
    return busy


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


def remove_lxc_cgroups(name: str, pool_prefix: str, prefix: bool = False,
                       timeout_s: float = 0.0,
                       between: Callable[[], None] | None = None) -> list[str]:
    """Remove container NAME's cgroups (every container's whose name starts with NAME, if
    `prefix`) and its monitor's, waiting up to `timeout_s` for a monitor that is still
    exiting (`between` runs before each try); return the busy ones."""
    deadline = time.monotonic() + timeout_s
    pool = pool_cgroup(pool_prefix)
    legacy = [p for p in _lxc_cgroup_parents() if p.is_dir()]
    pools = [base / sub for base in lxc_bases() for sub in (pool, f"{pool}.monitor")
             if (base / sub).is_dir()]
    while True:
        if between is not None:
            between()
        busy = [*_remove_named(legacy, ("lxc.monitor.", "lxc.payload."), name, prefix),
                *_remove_named(pools, ("",), name, prefix)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.02)


def _remove_named(parents: list[Path], kinds: tuple[str, ...], name: str,
                  prefix: bool) -> list[str]:
    """Remove each `<parent>/<kind><name>` cgroup; the busy ones."""
    busy = []
    for parent in parents:
        for child in parent.iterdir():
            if not child.is_dir():
                continue
            for kind in kinds:
                rest = child.name.removeprefix(kind)
                if kind and rest == child.name:
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
