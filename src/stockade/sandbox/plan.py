"""What every run of a zygote gets, worked out once at its start: the run plan (root
template, namespaces, seccomp program, ceilings). Immutable, shared by every fork, free of
secrets."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from stockade.limits import Limits
from stockade.sandbox import confine, libc, seccomp
from stockade.sandbox.config import SandboxConfig

BASE_RO_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs from its zygote; shared, immutable, free of secrets."""

    root: confine.RootPlan
    root_template_fd: int  # the zygote's root template (a mount namespace), see confine
    namespaces: int
    seccomp_program: bytes
    seccomp_buffer: ctypes.Array[ctypes.c_char]
    rlimit_nofile: int
    rlimit_nproc: int
    rlimit_stack_mib: int
    max_payload_bytes: int
    limit_ceiling: Limits
    max_out_files: int
    max_out_bytes: int


def read_only_paths(extra: list[str]) -> tuple[str, ...]:
    """Host paths a run sees read-only: the system, this interpreter and its packages."""
    wanted = [*BASE_RO_PATHS, sys.prefix, *sys.path, *extra]
    paths = sorted({os.path.normpath(p) for p in wanted
                    if p.startswith("/") and os.path.lexists(p)})
    cover: list[str] = []
    for path in paths:
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in cover):
            cover.append(path)
    return tuple(cover)


def make_plan(config: SandboxConfig) -> RunPlan:
    """What every run of a zygote with `config` gets: its root template (built here, under
    the state directory), namespaces, seccomp program and ceilings."""
    (Path(config.state_dir) / "root").mkdir(mode=0o700, exist_ok=True)
    root = confine.RootPlan(
        mount_point=str(Path(config.state_dir) / "root"),
        ro_paths=read_only_paths(config.extra_ro_paths),
        run_uid=config.run_uid, run_gid=config.run_gid,
        workdir_size_mib=config.workdir_size_mib, tmp_size_mib=config.tmp_size_mib,
        shm_size_mib=config.shm_size_mib)
    program = seccomp.build_program()
    return RunPlan(
        root=root, root_template_fd=make_root_template(root),
        namespaces=confine.namespace_flags(config.isolate_network),
        seccomp_program=program,
        seccomp_buffer=ctypes.create_string_buffer(program, len(program)),
        rlimit_nofile=config.rlimit_nofile, rlimit_nproc=config.rlimit_nproc,
        rlimit_stack_mib=config.rlimit_stack_mib,
        max_payload_bytes=config.max_payload_mib << 20,
        max_out_files=config.max_out_files, max_out_bytes=config.max_out_kib << 10,
        # Before its request a run may not know it is a session: the CPU ceiling is the
        # larger of a run's cap and a session's total (the request's limits lower it).
        limit_ceiling=msgspec.structs.replace(config.limits.maximum, cpu_time_s=max(
            config.limits.maximum.cpu_time_s, config.session_max_cpu_s)),
    )


def make_root_template(root: confine.RootPlan) -> int:
    """Build the read-only part of every run's root once, in a mount namespace of its own
    (a helper process builds it and exits); return a descriptor that keeps it alive."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        try:
            libc.unshare(libc.CLONE_NEWNS)
            confine.build_root_template(root)
            os.write(ready_w, b"ok")
        except BaseException as exc:
            os.write(ready_w, f"cannot build the runs' root: {exc}".encode()[:4000])
        finally:
            os.read(done_r, 1)  # keep the namespace alive until the zygote holds it
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 4096).decode(errors="replace")
        if answer != "ok":
            raise RuntimeError(answer or "the root template's builder died")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)
