"""The seccomp-bpf allow-list every run executes under, compiled once per zygote.

Default deny (EPERM); non-native ABIs (x32, i386) are denied; a few calls are allowed
only with safe arguments. This module must never widen the list for one run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

from stockade.sandbox import libc

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_CMP_EQ = 4
_SCMP_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _errno_action(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


DENY = _errno_action(errno.EPERM)

# Calls a Python program (threads, subprocesses, numpy, pandas) needs; Docker's default
# profile allows each of them too. Anything absent is refused with EPERM, including
# ptrace, mount, unshare, setns, bpf, perf_event_open, keyctl/add_key/request_key,
# io_uring_*, userfaultfd, process_vm_*, personality, kexec_* and module calls,
# pidfd_getfd, fsopen/fsconfig/fsmount/move_mount/open_tree, open_by_handle_at.
#
# Why the ones that look dangerous are here:
# - splice, tee, sendfile, copy_file_range: zero-copy I/O (shutil.copyfile uses them).
#   They share page-cache pages; the page-cache write bug they once exposed (Dirty Pipe)
#   is a kernel fix, not a filter's job, and a read-only root leaves little to target.
# - setuid/setgid/setgroups and friends: with every capability dropped and securebits
#   locked they can only keep or drop ids; libraries call them, e.g. before exec.
# - execve/execveat: no_new_privs is set and the root holds no set-id file.
# - prctl: cannot undo no_new_privs, securebits or a dropped capability.
# - kill/tgkill/tkill: reach only the run's own pid namespace.
# - shm*/sem*/msg*: a private IPC namespace per run.
# - mlock/mlock2: RLIMIT_MEMLOCK is 0.
# - restart_syscall: the kernel resumes an interrupted relative sleep with it (a run
#   stopped and continued by SIGSTOP/SIGCONT); refusing it made that sleep fail.
# - timer_*: POSIX timers signal only the calling process.
ALLOWED = """
read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 open openat
close close_range creat stat fstat lstat newfstatat statx statfs fstatfs lseek access
faccessat faccessat2 readlink readlinkat getdents getdents64 getcwd chdir fchdir rename
renameat renameat2 mkdir mkdirat rmdir link linkat unlink unlinkat symlink symlinkat
chmod fchmod fchmodat chown fchown lchown fchownat umask truncate ftruncate fsync
fdatasync flock fallocate fadvise64 sync_file_range utime utimes utimensat futimesat
sendfile copy_file_range splice tee dup dup2 dup3 fcntl pipe pipe2 poll ppoll select
pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2
eventfd eventfd2 timerfd_create timerfd_settime timerfd_gettime signalfd signalfd4
inotify_init inotify_init1 inotify_add_watch inotify_rm_watch memfd_create mmap mprotect
munmap mremap msync mincore madvise brk mlock munlock mlock2 membarrier rt_sigaction
rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigsuspend rt_sigqueueinfo
rt_tgsigqueueinfo sigaltstack kill tgkill tkill pause alarm getitimer setitimer
nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time restart_syscall
timer_create timer_settime timer_gettime timer_getoverrun timer_delete futex futex_waitv
set_robust_list get_robust_list set_tid_address rseq arch_prctl prctl sched_yield
sched_getaffinity sched_setaffinity sched_getparam sched_getscheduler
sched_get_priority_max sched_get_priority_min sched_rr_get_interval getpriority
setpriority getrlimit setrlimit prlimit64 getrusage sysinfo times uname getuid getgid
geteuid getegid getresuid getresgid getgroups capget setuid setgid setreuid setregid
setresuid setresgid setgroups setfsuid setfsgid getpid getppid gettid getpgrp getpgid
setpgid getsid setsid exit exit_group wait4 waitid execve execveat fork vfork getrandom
connect bind listen accept accept4 sendto recvfrom sendmsg recvmsg sendmmsg recvmmsg
shutdown getsockname getpeername setsockopt getsockopt shmget shmat shmdt shmctl semget
semop semtimedop semctl msgget msgsnd msgrcv msgctl
""".split()

# ioctl is allowed only for the terminal-free queries Python and its libraries make.
IOCTL_ALLOWED = {
    "TCGETS": 0x5401, "TIOCGWINSZ": 0x5413, "FIONREAD": 0x541B, "FIONBIO": 0x5421,
    "FIONCLEX": 0x5450, "FIOCLEX": 0x5451,
}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


class _Filter:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ctx = lib.seccomp_init(DENY)
        if not self.ctx:
            raise OSError("seccomp_init failed")
        self._set(_SCMP_FLTATR_ACT_BADARCH, DENY)
        self._set(_SCMP_FLTATR_CTL_NNP, 0)  # the child sets no_new_privs itself, in order

    def _set(self, attr: int, value: int) -> None:
        rc = self.lib.seccomp_attr_set(self.ctx, attr, value)
        if rc < 0:
            raise OSError(-rc, f"seccomp_attr_set({attr}): {os.strerror(-rc)}")

    def add(self, name: str, action: int = _SCMP_ACT_ALLOW,
            conditions: tuple[tuple[int, int, int, int], ...] = ()) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr == _NR_SCMP_ERROR:
            return  # not a syscall on this architecture
        cmps = (_ArgCmp * max(1, len(conditions)))(*[_ArgCmp(*c) for c in conditions])
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(conditions), cmps)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    def export(self) -> bytes:
        fd = os.memfd_create("seccomp-bpf")
        try:
            rc = self.lib.seccomp_export_bpf(self.ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
            self.lib.seccomp_release(self.ctx)


def build_program() -> bytes:
    """Compile the allow-list to classic BPF for this machine's native ABI."""
    f = _Filter(_load_libseccomp())
    for name in ALLOWED:
        f.add(name)
    # Threads and processes yes, new namespaces no. The flags are an unsigned long.
    f.add("clone", conditions=((0, _SCMP_CMP_MASKED_EQ, libc.NAMESPACE_FLAGS, 0),))
    # glibc falls back to clone() only on ENOSYS; clone3's flags sit in memory BPF can't read.
    f.add("clone3", action=_errno_action(errno.ENOSYS))
    for call in ("socket", "socketpair"):
        f.add(call, conditions=((0, _SCMP_CMP_EQ, socket.AF_UNIX, 0),))
    for request in IOCTL_ALLOWED.values():
        # The kernel reads the request as 32 bits: mask, or 0x1_0000_5412 would slip through.
        f.add("ioctl", conditions=((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request),))
    return f.export()
