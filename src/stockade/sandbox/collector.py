"""The out/ collector: brings back the regular files a run left under out/.

A process of its own, forked from the zygote after the whole run is dead, so nothing
changes underneath. It takes the run's uid (no capability, no more rights than the program
had) and walks out/ from the run's workdir one directory descriptor at a time, never
following a symlink, never reading a hard-linked file, a FIFO or a device.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat

import msgspec

from stockade import protocol
from stockade.sandbox import libc
from stockade.sandbox.family import KILL_GRACE_S, exited
from stockade.sandbox.plan import RunPlan
from stockade.sandbox.worker import worker_steps

MAX_OUT_ENTRIES = 4096  # directory entries the out/ collector looks at, at most


def run_collector(outbox: int, workdir: int, plan: RunPlan, pid_ns_fd: int) -> str | None:
    """Fork the collector (in the zygote's own pid namespace, not the dead run's) and wait
    for it; None when it ran, else why it could not."""
    libc.setns(pid_ns_fd, libc.CLONE_NEWPID)
    try:
        pid = os.fork()
    except OSError as exc:
        return f"cannot collect a run's out/: {exc}"
    if pid == 0:
        try:
            collect_outputs(outbox, workdir, plan)
        finally:
            os._exit(0)
    pidfd = os.pidfd_open(pid)
    if not exited(pidfd, KILL_GRACE_S):  # the walk is capped; this is a backstop
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(pidfd)
    return None


def has_out_dir(workdir: int) -> bool:
    """Most programs leave no out/: then there is nothing to kill, drop or walk."""
    try:
        return stat.S_ISDIR(os.stat(protocol.OUT_DIR, dir_fd=workdir,
                                    follow_symlinks=False).st_mode)
    except OSError:
        return False


def confine_collector(plan: RunPlan, keep: set[int]) -> None:
    """The collector walks what a run left, so it is confined like one, by the worker's
    own steps in their order: rlimits, the run's uid, locked securebits, no capability,
    no_new_privs, the run's seccomp filter, only `keep` open, a whitelisted environment."""
    for _, apply in worker_steps(plan, keep):
        apply()


def collect_outputs(outbox: int, workdir: int, plan: RunPlan) -> None:
    """In the collector: write the files under out/ into the client's outbox."""
    confine_collector(plan, keep={outbox, workdir})
    collected = _Collector(plan.max_out_files, plan.max_out_bytes)
    try:
        root = os.open(protocol.OUT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=workdir)
    except OSError:
        root = -1  # no out/ (or not a directory): no files
    if root >= 0:
        collected.walk(root, "", 1)
    content = protocol.OutboxContent(files=collected.files, truncated=collected.truncated)
    view = memoryview(msgspec.msgpack.encode(content))
    while view:
        view = view[os.write(outbox, view):]
    os.close(outbox)


class _Collector:
    def __init__(self, max_files: int, max_bytes: int) -> None:
        self.files: list[protocol.OutputFile] = []
        self.truncated = False
        self.max_files = max_files
        self.budget = max_bytes
        # Names looked at, in all: a tmpfs holds millions of empty files in a few MiB.
        self.entries_left = MAX_OUT_ENTRIES

    def walk(self, directory: int, prefix: str, depth: int) -> None:
        try:
            with os.scandir(directory) as entries:
                names = sorted(e.name for e in itertools.islice(entries, self.entries_left + 1))
        except OSError:
            self.truncated = True
            names = []
        if len(names) > self.entries_left:
            self.truncated = True
        for name in names[:self.entries_left]:
            self.entries_left -= 1
            self._entry(directory, name, f"{prefix}{name}", depth)
        os.close(directory)

    def _entry(self, directory: int, name: str, path: str, depth: int) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(name, flags, dir_fd=directory)
        except OSError:
            self.truncated = True  # a symlink (ELOOP), or unreadable
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and depth < protocol.MAX_PATH_DEPTH:
            self.walk(fd, f"{path}/", depth + 1)
            return
        wanted = stat.S_ISREG(st.st_mode) and st.st_nlink == 1  # never a planted hard link
        fits = len(self.files) < self.max_files and st.st_size <= self.budget
        try:
            if wanted and fits:
                self._read(fd, path)
            else:
                self.truncated = True
        finally:
            os.close(fd)

    def _read(self, fd: int, path: str) -> None:
        data = bytearray()
        while len(data) <= self.budget:
            chunk = os.read(fd, min(65536, self.budget + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        if len(data) > self.budget:
            self.truncated = True
            return
        self.budget -= len(data)
        self.files.append(protocol.OutputFile(path, bytes(data)))
