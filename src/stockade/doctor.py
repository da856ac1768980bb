"""`stockade doctor`: what this host must have before it can serve (and build the sandbox
image), one check a line with the fix when it fails. It changes nothing on the host: the one
check that must try something (an idmapped overlay) does it in a directory it removes.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stockade.runner.config import RunnerConfig
from stockade.runner.manager import apparmor, idmap
from stockade.sandbox import libc
from stockade.sandbox.cgroups import MOUNTINFO, parse_mountinfo

PACKER_MIN = (1, 6, 6)
IDMAP_KERNEL_MIN = (5, 19)  # idmapped mounts of ext4, xfs and btrfs, under overlayfs
PYTHON_MIN = (3, 11)
# The environments' sandbox images (two with the data set, ~1 GiB each, and a small one)
# and their build: Packer's build container and its export beside it, LXC's template cache
# of each Debian release.
DISK_MIN_GIB = {"serve": 4.0, "build": 10.0}
PACKAGES = "make packages (or apt-get install {})"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        fix = f"\n       fix: {self.fix}" if not self.ok and self.fix else ""
        return f"{mark}  {self.name}: {self.detail}{fix}"


def _install(package: str) -> str:
    return PACKAGES.format(package)


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"running as uid {os.geteuid()}",
                 "run as root: the runner creates containers, cgroups and mounts")


def check_python() -> Check:
    version = sys.version_info[:2]
    ok = version >= PYTHON_MIN
    return Check("python", ok, f"{sys.executable} is {version[0]}.{version[1]}",
                 f"Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]} or newer (Debian 12's python3)")


def check_user_namespaces(proc: Path = Path("/proc/sys")) -> Check:
    """Unprivileged containers live in a user namespace LXC makes as root."""
    try:
        most = int((proc / "user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        return Check("user namespaces", False, "the kernel has no user namespaces",
                     "a kernel built with CONFIG_USER_NS (every Debian kernel is)")
    return Check("user namespaces", most > 0, f"user.max_user_namespaces = {most}",
                 "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/)")


def check_cgroups(mountinfo: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> Check:
    """The memory, pids and cpu controllers: v1 hierarchies or the v2 tree."""
    text = Path(MOUNTINFO).read_text() if mountinfo is None else mountinfo
    unified, v1 = parse_mountinfo(text)
    if "memory" in v1:
        missing = [c for c in ("memory", "pids", "cpuacct") if c not in v1]
        return Check("cgroups", not missing,
                     "v1: " + (f"missing {', '.join(missing)}" if missing
                               else "memory, pids and cpuacct are mounted"),
                     "mount the missing cgroup v1 controllers, or boot with cgroup v2")
    if unified is None:
        return Check("cgroups", False, "no cgroup v1 memory hierarchy and no cgroup2 mount",
                     "mount cgroup2 on /sys/fs/cgroup (systemd does at boot)")
    try:
        have = set((root / "cgroup.controllers").read_text().split())
    except OSError:
        have = set()
    missing = [c for c in ("memory", "pids", "cpu") if c not in have]
    return Check("cgroups", not missing,
                 "v2: " + (f"missing {', '.join(missing)}" if missing
                           else "memory, pids and cpu are available"),
                 "enable the controllers (cgroup_enable=memory on the kernel command line)")


def check_overlayfs(filesystems: Path = Path("/proc/filesystems")) -> Check:
    """Pool containers are overlay snapshot clones of the image."""
    try:
        known = {line.split()[-1] for line in filesystems.read_text().splitlines() if line}
    except OSError:
        known = set()
    if "overlay" in known:
        return Check("overlayfs", True, "the kernel knows overlay")
    module = Path("/lib/modules") / os.uname().release
    found = any(module.rglob("overlay.ko*")) if module.is_dir() else False
    return Check("overlayfs", found, "overlay is a module, loaded at the first mount"
                 if found else "the kernel has no overlay filesystem",
                 "a kernel with CONFIG_OVERLAY_FS (modprobe overlay)")


def _subid_owner(path: Path, base: int, size: int) -> tuple[bool, str]:
    """(a range of root's covers it, or the user whose range overlaps it)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False, ""
    for line in lines:
        entry = idmap.subid_entry(line)
        if entry is None:
            continue
        if idmap.root_covers(entry, base, size):
            return True, ""
        user, start, count = entry
        if start < base + size and base < start + count and user not in ("root", "0"):
            return False, user
    return False, ""


def check_subids(config: RunnerConfig, etc: Path = Path("/etc")) -> Check:
    """root's subordinate ids: the containers' uid range, which `stockade serve` adds."""
    base, size = config.idmap_base, config.idmap_span
    span = f"{base}-{base + size - 1}"
    found = {name: _subid_owner(etc / name, base, size) for name in ("subuid", "subgid")}
    for name, (_, other) in found.items():
        if other:
            return Check("subordinate ids", False, f"/etc/{name} gives {span} to {other}",
                         f"remove {other}'s overlapping range or set idmap_base in the "
                         "runner config")
    if not all(has for has, _ in found.values()):
        return Check("subordinate ids", True,
                     f"root has no {span} range yet; `stockade serve` adds it")
    return Check("subordinate ids", True, f"root has {span} in /etc/subuid and /etc/subgid")


def which(name: str) -> str | None:
    """`name` on PATH, or beside this interpreter: the venv's own tools (ansible-playbook)
    when stockade is run as .venv/bin/stockade, with no venv on PATH."""
    own = str(Path(sys.executable).parent)
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), own]))


def check_program(name: str, package: str, why: str) -> Check:
    path = which(name)
    return Check(name, path is not None, f"{path} ({why})" if path else f"not found ({why})",
                 _install(package))


def check_library(name: str, package: str) -> Check:
    found = ctypes.util.find_library(name)
    return Check(f"lib{name}", found is not None, found or "not found", _install(package))


def check_lxc_bindings() -> Check:
    try:
        import lxc  # type: ignore[import-untyped]  # noqa: F401, PLC0415
    except ImportError as exc:
        return Check("LXC bindings", False, f"cannot import lxc ({exc})",
                     "make install (builds them against lxc-dev)")
    return Check("LXC bindings", True, "the lxc module imports")


def check_seccomp(status: Path = Path("/proc/self/status")) -> Check:
    text = status.read_text()
    ok = re.search(r"^Seccomp:", text, re.MULTILINE) is not None
    return Check("seccomp", ok, "the kernel filters system calls" if ok
                 else "the kernel has no seccomp", "a kernel with CONFIG_SECCOMP_FILTER")


def check_disk(path: str, need_gib: float, name: str = "disk") -> Check:
    where = Path(path)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free / (1 << 30)
    return Check(name, free >= need_gib, f"{free:.1f} GiB free under {where} "
                 f"(needs {need_gib:.0f} GiB)", f"free space under {where}")


def parse_packer_version(text: str) -> tuple[int, ...] | None:
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in found.groups()) if found else None


def check_packer() -> Check:
    packer = which("packer")
    if packer is None:
        return Check("packer", False, "not found (builds the sandbox image)", _install("packer"))
    answer = subprocess.run([packer, "version"], capture_output=True, text=True, check=False)
    version = parse_packer_version(answer.stdout)
    ok = version is not None and version >= PACKER_MIN
    shown = ".".join(map(str, version)) if version else "unknown"
    return Check("packer", ok, f"{packer} is {shown} (needs {'.'.join(map(str, PACKER_MIN))}+)",
                 "Debian 12's packer package (1.6.6)")


def check_apparmor(enabled: Path = apparmor.ENABLED,
                   profiles: Path = apparmor.PROFILES) -> Check:
    """Where the kernel enforces AppArmor, pool containers need stockade's profile."""
    if not apparmor.enforced(enabled):
        return Check("AppArmor", True, "not enforced by this kernel (LXC ignores the key)")
    try:
        names = apparmor.loaded(profiles)
    except OSError as exc:
        return Check("AppArmor", False, f"enforced, but {profiles} cannot be read "
                     f"({exc.strerror})", "mount securityfs on /sys/kernel/security")
    ok = apparmor.PROFILE in names
    return Check("AppArmor", ok, f"enforced; profile {apparmor.PROFILE} "
                 f"{'loaded' if ok else 'not loaded'}", apparmor.HOW_TO_LOAD)


def kernel_version(release: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


IDMAP_FIX = ("Linux 5.19 or later (Debian 12's 6.1 is), and lxc_path on a filesystem with "
             "idmapped mounts (ext4, xfs, btrfs; not tmpfs or overlayfs before Linux 6.x)")


def check_idmapped_mounts(config: RunnerConfig, release: str | None = None) -> Check:
    """Every container past the first uid range sees the image through an idmapped mount
    that its overlay takes as the lower layer: tried for real, as a container does it, in a
    temporary directory on the filesystem that holds lxc_path."""
    name = "idmapped mounts"
    release = release or os.uname().release
    if kernel_version(release) < IDMAP_KERNEL_MIN:
        return Check(name, False, f"Linux {release} has none (5.19 or later has them)",
                     IDMAP_FIX)
    where = Path(config.lxc_path)
    while not where.exists():
        where = where.parent
    try:
        shifted = _try_idmapped_overlay(where, config.idmap_base, config.idmap_size)
    except OSError as exc:
        return Check(name, False, f"an idmapped overlay under {where} failed: {exc}", IDMAP_FIX)
    expected = config.idmap_base + config.idmap_size
    return Check(name, shifted == expected, f"an idmapped overlay under {where} shows the "
                 f"image's uid {config.idmap_base} as {shifted} (expected {expected})",
                 IDMAP_FIX)


def _try_idmapped_overlay(where: Path, base: int, size: int) -> int:
    """The owner a file of the image's range shows through an idmapped view of its
    directory (the second range's), under an overlay, as a container's root does."""
    views = idmap.Views(base, size)
    with tempfile.TemporaryDirectory(prefix=".stockade-doctor-", dir=where) as scratch:
        top = Path(scratch)
        for part in ("lower", "upper", "work", "view", "merged"):
            (top / part).mkdir()
        probe = top / "lower" / "probe"
        probe.touch()
        os.chown(probe, base, base)
        mounted: list[Path] = []
        try:
            views.mount(top / "lower", base + size, top / "view")
            mounted.append(top / "view")
            libc.mount("stockade-doctor", str(top / "merged"), "overlay", 0,
                       f"lowerdir={top / 'view'},upperdir={top / 'upper'},"
                       f"workdir={top / 'work'}")
            mounted.append(top / "merged")
            return (top / "merged" / "probe").stat().st_uid
        except idmap.RangeError as exc:
            raise OSError(str(exc)) from None
        finally:
            for point in reversed(mounted):
                libc.umount2(str(point), libc.MNT_DETACH)
            views.close()


def check_listen(config: RunnerConfig) -> Check:
    """The runner's address is free (a runner already serving there says so)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            return Check("listen address", False,
                         f"{config.host}:{config.port} is taken ({exc.strerror})",
                         "stop what listens there, or serve elsewhere: make run "
                         "LISTEN=127.0.0.1:8081")
    return Check("listen address", True, f"{config.host}:{config.port} is free")


def serve_checks(config: RunnerConfig) -> Iterator[Callable[[], Check]]:
    """What `stockade serve` needs on a host that imports a built image."""
    yield check_root
    yield check_python
    yield check_user_namespaces
    yield check_cgroups
    yield check_overlayfs
    yield lambda: check_idmapped_mounts(config)
    yield check_seccomp
    yield lambda: check_subids(config)
    yield lambda: check_program("lxc-start", "lxc", "starts the pool's containers")
    yield lambda: check_program("newuidmap", "uidmap", "maps the containers' uids")
    yield lambda: check_program("catatonit", "catatonit", "every run's init on this host")
    yield lambda: check_library("seccomp", "libseccomp2")
    yield check_lxc_bindings
    yield check_apparmor
    yield lambda: check_disk(config.lxc_path, DISK_MIN_GIB["serve"])
    yield lambda: check_listen(config)


def build_checks() -> Iterator[Callable[[], Check]]:
    """What building the sandbox image adds (`make sandbox-image`)."""
    yield check_packer
    yield lambda: check_program("debootstrap", "debootstrap", "LXC's debian template")
    yield lambda: check_program("rsync", "rsync", "LXC's debian template copies its cache")
    yield lambda: check_program("debian-distro-info", "distro-info",
                                "LXC's debian template names bookworm's security suite")
    yield lambda: check_program("ansible-playbook", "ansible-core",
                                "provisions the image; make install puts it in .venv/bin")
    yield lambda: check_disk("/var/lib/lxc", DISK_MIN_GIB["build"], "disk for the build")


def run_checks(config: RunnerConfig, build: bool) -> list[Check]:
    checks = list(serve_checks(config))
    if build:
        checks.extend(build_checks())
    results = []
    for check in checks:
        try:
            results.append(check())
        except OSError as exc:
            results.append(Check(getattr(check, "__name__", "check"), False,
                                 f"could not be checked: {exc}"))
    return results
