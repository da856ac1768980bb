"""Per-run cgroups on v1 (memory, pids, cpuacct hierarchies) and v2 (one unified tree).

A run's cgroup holds its memory and process limits and is the source of its CPU time,
memory peak and OOM kills. It must never be shared by two runs: one cgroup per run,
removed after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
V1_CONTROLLERS = ("memory", "pids", "cpuacct")
V2_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(RuntimeError):
    """The cgroup layer is missing or refused an operation."""

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


def _read(path: Path) -> str:
    return path.read_text()


def write_value(path: Path, value: str) -> None:
    """Write one value to a cgroup file; CgroupError (with the errno) says which refused."""
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}",
                          exc.errno or 0) from None


def _keyed(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    """Return (cgroup2 mount, {v1 controller: mount}) from /proc/self/mountinfo text."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, options = Path(fields[4]), tail[0], tail[2].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = mount_point
        elif fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, mount_point)
    return unified, v1


class RunCgroup:
    """The cgroup(s) of one run. `procs_paths` are what the run's init joins."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs
        self._cpu_start = 0.0
        self._oom_start = 0
        self._peak_fd: int | None = None

    @property
    def procs_paths(self) -> list[Path]:
        return [d / "cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def _file(self, controller: str, name: str) -> Path:
        return self.dirs[controller] / name

    def set_memory_limit(self, limit_bytes: int) -> None:
        if self.version == 1:
            write_value(self._file("memory", "memory.limit_in_bytes"), str(limit_bytes))
            memsw = self._file("memory", "memory.memsw.limit_in_bytes")
            if memsw.exists():  # no swap for a run: memory+swap == memory
                write_value(memsw, str(limit_bytes))
        else:
            write_value(self._file("memory", "memory.max"), str(limit_bytes))
            swap = self._file("memory", "memory.swap.max")
            if swap.exists():
                write_value(swap, "0")
            write_value(self._file("memory", "memory.oom.group"), "1")

    def set_pids_limit(self, limit: int) -> None:
        write_value(self._file("pids", "pids.max"), str(limit))

    def begin(self) -> None:
        """Mark the start of the program: CPU and OOM count from here, the peak is reset."""
        self._cpu_start = self.cpu_time_s()
        self._oom_start = self._oom_kills()
        if self.version == 1:
            write_value(self._file("memory", "memory.max_usage_in_bytes"), "0")
            return
        with contextlib.suppress(OSError):
            fd = os.open(self._file("memory", "memory.peak"), os.O_RDWR | os.O_CLOEXEC)
            self._peak_fd = fd
            # Per-fd reset needs kernel 6.12+; before that the peak includes init's setup.
            os.write(fd, b"reset\n")

    def cpu_time_s(self) -> float:
        if self.version == 1:
            return int(_read(self._file("cpuacct", "cpuacct.usage"))) / 1e9
        return _keyed(_read(self._file("cpu", "cpu.stat")), "usage_usec") / 1e6

    def run_cpu_time_s(self) -> float:
        return max(0.0, self.cpu_time_s() - self._cpu_start)

    def _oom_kills(self) -> int:
        if self.version == 1:
            return _keyed(_read(self._file("memory", "memory.oom_control")), "oom_kill")
        return _keyed(_read(self._file("memory", "memory.events")), "oom_kill")

    def oom_killed(self) -> bool:
        return self._oom_kills() > self._oom_start

    def memory_peak_kib(self) -> int:
        if self.version == 1:
            return int(_read(self._file("memory", "memory.max_usage_in_bytes"))) // 1024
        if self._peak_fd is not None:
            return int(os.pread(self._peak_fd, 64, 0)) // 1024
        return 0

    def is_empty(self) -> bool:
        return all(not p.read_text().strip() for p in self.procs_paths)

    def remove(self, timeout_s: float = 2.0) -> bool:
        """Remove the cgroup once its last task has gone; False if it is still busy."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        deadline = time.monotonic() + timeout_s
        for directory in dict.fromkeys(self.dirs.values()):
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        return False
                    time.sleep(0.002)
        return True


class CgroupDriver:
    """Creates run cgroups under `parent` (a path relative to each hierarchy's root)."""

    def __init__(self, parent: str, mountinfo: str | None = None) -> None:
        text = mountinfo if mountinfo is not None else Path(MOUNTINFO).read_text()
        unified, v1 = parse_mountinfo(text)
        self.parent = parent.strip("/")
        if all(c in v1 for c in V1_CONTROLLERS):
            self.version = 1
            self.roots = {c: v1[c] / self.parent for c in V1_CONTROLLERS}
        elif unified is not None and (unified / "cgroup.controllers").exists() and set(
                V2_CONTROLLERS) <= set(_read(unified / "cgroup.controllers").split()):
            self.version = 2
            self.roots = {c: unified / self.parent for c in V2_CONTROLLERS}
            self._unified = unified
        else:
            raise CgroupError("no usable cgroup hierarchy: need v1 memory, pids and cpuacct "
                              "controllers, or cgroup2 with memory, pids and cpu enabled")

    def prepare(self) -> None:
        """Create the parent cgroups and, on v2, delegate the controllers down to them."""
        for root in dict.fromkeys(self.roots.values()):
            root.mkdir(parents=True, exist_ok=True)
        if self.version == 2:
            enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
            try:
                write_value(self._unified / "cgroup.subtree_control", enable)
            except CgroupError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                self.leave_delegation_root()
                write_value(self._unified / "cgroup.subtree_control", enable)
            node = self._unified
            for part in Path(self.parent).parts:
                node = node / part
                write_value(node / "cgroup.subtree_control", enable)

    def leave_delegation_root(self) -> None:
        """cgroup v2 lets a non-root cgroup hand controllers down only while it holds no
        process. A zygote that is its container's init sits in the container's root
        cgroup (EBUSY): it moves itself into a leaf of its own, beside the run cgroups."""
        leaf = self._unified / f"{self.parent.split('/')[0]}-zygote"
        leaf.mkdir(exist_ok=True)
        write_value(leaf / "cgroup.procs", str(os.getpid()))

    def create(self, name: str) -> RunCgroup:
        dirs = {c: root / name for c, root in self.roots.items()}
        for directory in dict.fromkeys(dirs.values()):
            try:
                directory.mkdir()
            except FileExistsError:
                pass  # a leftover of a crashed zygote with the same name: reused, then removed
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from None
        return RunCgroup(self.version, dirs)

    def sweep(self, prefix: str, timeout_s: float = 0.0) -> list[str]:
        """Remove leftover run cgroups named `prefix`*; return those still busy."""
        deadline = time.monotonic() + timeout_s
        while True:
            busy = []
            for root in dict.fromkeys(self.roots.values()):
                if not root.is_dir():
                    continue
                for child in root.iterdir():
                    if child.is_dir() and child.name.startswith(prefix):
                        try:
                            child.rmdir()
                        except OSError:
                            busy.append(str(child))
            if not busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.01)
