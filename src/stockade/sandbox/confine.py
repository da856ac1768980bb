"""The confinement steps a run applies to itself, each named for what it guarantees.

Order matters and is fixed by `stockade.sandbox.worker`: namespaces -> mounts -> rlimits ->
identity -> securebits -> capabilities -> no_new_privs -> seccomp -> fds -> environment.
A step either fully succeeds or raises; none of them degrades silently.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stockade.limits import Limits
from stockade.sandbox import libc
from stockade.sandbox.config import HOSTNAME, RUN_ENVIRONMENT, WORKDIR

DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
# statvfs flags a read-only bind remount must keep: inside a user namespace the kernel
# refuses a remount that would clear a flag the mount was locked with.
_STATVFS_TO_MS = ((os.ST_NOSUID, libc.MS_NOSUID), (os.ST_NODEV, libc.MS_NODEV),
                  (os.ST_NOEXEC, libc.MS_NOEXEC), (os.ST_NOATIME, libc.MS_NOATIME),
                  (os.ST_NODIRATIME, libc.MS_NODIRATIME), (os.ST_RELATIME, libc.MS_RELATIME))
PROC_KEEPER = "/.stockade"  # in every run's root, mode 0700: see build_root_template
RLIMIT_LOCKS = 10  # <sys/resource.h>; obsolete since 2.4.25 but set anyway: free to refuse
_PRIVATE_TMPFS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
SECUREBITS_LOCKED = (
    libc.SECBIT_NOROOT | libc.SECBIT_NOROOT_LOCKED
    | libc.SECBIT_NO_SETUID_FIXUP | libc.SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc.SECBIT_KEEP_CAPS_LOCKED
    | libc.SECBIT_NO_CAP_AMBIENT_RAISE | libc.SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


@dataclass(frozen=True)
class RootPlan:
    """What a run's filesystem holds: read-only host paths and capped private tmpfs mounts."""

    mount_point: str
    ro_paths: tuple[str, ...]
    run_uid: int
    run_gid: int
    workdir_size_mib: int
    tmp_size_mib: int
    shm_size_mib: int


def namespace_flags(isolate_network: bool) -> int:
    """The namespaces a run's worker unshares (its pid namespace comes from the zygote)."""
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
    return flags | libc.CLONE_NEWNET if isolate_network else flags


def enter_new_pid_namespace_for_children(own_pid_ns_fd: int) -> None:
    """Make the next child of this process (the run's init) pid 1 of a fresh pid namespace;
    the children after it join that namespace."""
    libc.setns(own_pid_ns_fd, libc.CLONE_NEWPID)  # undo the previous run's unshare
    libc.unshare(libc.CLONE_NEWPID)


def enter_namespaces(flags: int) -> None:
    """Private mount table, SysV IPC, hostname and (unless disabled) network."""
    libc.unshare(flags)


def _bind(source: str, target: str, flags: int) -> None:
    libc.mount(source, target, None, libc.MS_BIND)
    locked = os.statvfs(source).f_flag
    for st_flag, ms_flag in _STATVFS_TO_MS:
        if locked & st_flag:
            flags |= ms_flag
    libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | flags)


_READ_ONLY = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV


def _tmpfs(target: str, options: str, flags: int = _PRIVATE_TMPFS) -> None:
    os.makedirs(target, exist_ok=True)
    libc.mount("tmpfs", target, "tmpfs", flags, options)


def _mirror_read_only(root: str, path: str) -> None:
    target = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
        _bind(path, target, _READ_ONLY)


def _populate_dev(root: str) -> None:
    dev = root + "/dev"
    _tmpfs(dev, "mode=0755,size=64k", libc.MS_NOSUID | libc.MS_NOEXEC)
    for name in DEVICES:
        Path(f"{dev}/{name}").touch(mode=0o666)
        _bind(f"/dev/{name}", f"{dev}/{name}", libc.MS_NOSUID | libc.MS_NOEXEC)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    libc.mount(None, dev, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY
               | libc.MS_NOSUID | libc.MS_NOEXEC)


def _private_mounts(plan: RootPlan) -> tuple[tuple[str, str], ...]:
    """The size-capped tmpfs every run gets fresh: (mount point, options)."""
    return (("/tmp", f"mode=1777,size={plan.tmp_size_mib}m"),
            ("/dev/shm", f"mode=1777,size={plan.shm_size_mib}m"),
            (WORKDIR, f"mode=0755,uid={plan.run_uid},gid={plan.run_gid},"
                      f"size={plan.workdir_size_mib}m"))


def _covered(plan: RootPlan) -> tuple[str, ...]:
    """Read-only paths that a run's fresh tmpfs would hide (an interpreter under /tmp)."""
    tops = [target for target, _ in _private_mounts(plan)]
    return tuple(path for path in plan.ro_paths
                 if any(path.startswith(top + "/") for top in tops))


def build_root_template(plan: RootPlan) -> None:
    """Make this process's (fresh, unshared) mount namespace the read-only part of every
    run's root: a tmpfs holding read-only binds of the host paths, a minimal /dev, and
    empty mount points for /proc and the run's private tmpfs. Built once per zygote; each
    run's worker copies it (`enter_private_root`) and mounts only what is its own."""
    root = plan.mount_point
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount("tmpfs", root, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755,size=256k")
    os.makedirs(root + "/proc")
    # Inside a user namespace the kernel mounts a fresh proc only where a proc is already
    # fully visible (mount_too_revealing): keep the zygote's, beneath a directory only
    # root may enter, so that each run's worker can mount its own.
    os.mkdir(root + PROC_KEEPER, 0o700)
    os.mkdir(root + PROC_KEEPER + "/proc")
    libc.mount("/proc", root + PROC_KEEPER + "/proc", None, libc.MS_BIND | libc.MS_REC)
    _populate_dev(root)
    for target, _ in _private_mounts(plan):
        os.makedirs(root + target, exist_ok=True)
    for path in plan.ro_paths:
        _mirror_read_only(root, path)
    os.chdir(root)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)  # the old root, stacked on top by pivot_root
    os.chdir("/")
    libc.mount(None, "/", None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY
               | libc.MS_NOSUID | libc.MS_NODEV)


def join_root_template(template_fd: int) -> None:
    """Enter the zygote's root template; the unshare that follows makes a private copy."""
    libc.setns(template_fd, libc.CLONE_NEWNS)
    os.close(template_fd)


# The run's /proc, first choice first: read-only, its own processes only, nothing
# host-wide (no /proc/sys, sysrq-trigger, kcore, meminfo, stat). Kernels before 5.8 know
# neither `subset=pid` nor `hidepid=invisible`: each older spelling gives up less.
RUN_PROC_OPTIONS = ("subset=pid,hidepid=invisible", "hidepid=invisible", "hidepid=2")


def mount_run_proc(target: str = "/proc",
                   mount: Callable[[str, str, str, int, str], None] = libc.mount) -> str:
    """Mount the run's /proc with the best options this kernel takes; return them."""
    for options in RUN_PROC_OPTIONS:
        try:
            mount("proc", target, "proc", _PRIVATE_TMPFS | libc.MS_RDONLY, options)
            return options
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    raise OSError(errno.EINVAL, f"the kernel takes none of {RUN_PROC_OPTIONS} for proc")


def enter_private_root(plan: RootPlan) -> None:
    """In a private copy of the root template: a fresh /proc of the run's pid namespace
    and fresh size-capped tmpfs for the workdir, /tmp and /dev/shm. Nothing else is
    visible, and nothing of one run's files reaches another. The zygote's own proc, kept
    in the template only so that this mount is allowed, is detached from the run."""
    mount_run_proc()
    libc.umount2(PROC_KEEPER + "/proc", libc.MNT_DETACH)
    covered = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in _covered(plan)]
    for target, options in _private_mounts(plan):
        libc.mount("tmpfs", target, "tmpfs", _PRIVATE_TMPFS, options)
    for path, fd in covered:  # what the fresh tmpfs hid, bound again beneath it
        os.makedirs(path, exist_ok=True)
        _bind(f"/proc/self/fd/{fd}", path, _READ_ONLY)
        os.close(fd)
    os.chdir(WORKDIR)


def set_hostname() -> None:
    libc.sethostname(HOSTNAME)


def apply_rlimits(limits: Limits, nofile: int, nproc: int, stack_mib: int) -> None:
    """Per-process ceilings; the cgroup holds the run-wide ones."""
    cpu = limits.rlimit_cpu_s
    fsize = limits.file_size_kib * 1024
    for which, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, nofile, nofile),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_STACK, stack_mib << 20, stack_mib << 20),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (RLIMIT_LOCKS, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),
        (resource.RLIMIT_RTPRIO, 0, 0),
    ):
        resource.setrlimit(which, (soft, hard))
    # Python ignores SIGXFSZ; a run that outgrows RLIMIT_FSIZE must die so it can be told.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def drop_identity(uid: int, gid: int) -> None:
    """No supplementary groups, then gid, then uid; keep the permitted caps one step more
    so the bounding set and securebits can still be locked."""
    libc.prctl(libc.PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError("uid/gid did not change")


def _raise_setpcap() -> None:
    _, permitted, _ = libc.capget()
    if not permitted & (1 << libc.CAP_SETPCAP):
        raise OSError("CAP_SETPCAP is not permitted: cannot lock down capabilities")
    libc.capset(1 << libc.CAP_SETPCAP, permitted, 0)


def lock_securebits() -> None:
    """Root gains nothing from exec or uid changes, ambient caps can't be raised, and none
    of this can be undone."""
    _raise_setpcap()
    libc.prctl(libc.PR_SET_SECUREBITS, SECUREBITS_LOCKED)


@functools.cache  # read once in the zygote, before its forks
def last_capability() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def drop_capabilities() -> None:
    """Empty every capability set, the bounding and ambient sets included."""
    _raise_setpcap()
    for cap in range(last_capability() + 1):
        libc.prctl(libc.PR_CAPBSET_DROP, cap)
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    libc.capset(0, 0, 0)
    if libc.capget() != (0, 0, 0):
        raise OSError("capabilities remain after capset")


def set_no_new_privs() -> None:
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)


def load_seccomp_filter(program: bytes, buffer: ctypes.Array[ctypes.c_char]) -> None:
    libc.seccomp_set_filter(program, buffer)


def volunteer_for_oom() -> None:
    """Make this process (and what it forks) the OOM killer's first choice, before its
    zygote and anything else on the host: in a container's, the pool's or the host's
    out-of-memory, a run dies first. Raising the score needs no privilege."""
    with open("/proc/self/oom_score_adj", "w") as score:
        score.write("1000")


def close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor but `keep`: nothing of the zygote's reaches the program."""
    low = 0
    for fd in sorted(keep | {-1}):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


@functools.cache  # the block's address is inherited across fork: found once, in the zygote
def environ_block() -> tuple[int, int]:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[47]), int(fields[48])  # env_start, env_end (stat fields 50, 51)


def reset_environment() -> None:
    """The program sees only the whitelisted environment, in os.environ and in
    /proc/self/environ (whose bytes are the zygote's, inherited across fork)."""
    os.environ.clear()
    os.environ.update(RUN_ENVIRONMENT)
    start, end = environ_block()
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)
