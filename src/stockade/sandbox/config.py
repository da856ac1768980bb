"""Configuration of one zygote. Holds no secrets: it is visible to every run it forks."""

from __future__ import annotations

import msgspec

from stockade.limits import LimitPolicy

# What a run's environment holds, and nothing else.
RUN_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/box",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
}
WORKDIR = "/box"
HOSTNAME = "sandbox"
DEFAULT_PRELOAD = [
    "json", "re", "math", "collections", "itertools", "functools", "decimal",
    "fractions", "datetime", "random", "string", "heapq", "bisect", "statistics",
    "dataclasses", "typing", "io", "csv", "traceback", "runpy",
]


class SandboxConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    socket_path: str
    # Where the zygote keeps its mount point for run roots; created, owned by root.
    state_dir: str
    name: str = "zygote"
    run_uid: int = 61000
    run_gid: int = 61000
    preload: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_PRELOAD))
    limits: LimitPolicy = LimitPolicy()
    isolate_network: bool = True
    cgroup_parent: str = "stockade"
    workdir_size_mib: int = 64
    tmp_size_mib: int = 64
    shm_size_mib: int = 16
    rlimit_nofile: int = 256
    rlimit_nproc: int = 512
    rlimit_stack_mib: int = 8
    max_payload_mib: int = 32
    # What a run's init brings back from the program's out/ directory.
    max_out_files: int = 16
    max_out_kib: int = 1024
    # The most a session (a run that lives across calls) may ask for: its life, its
    # total CPU time.
    session_max_ttl_s: float = 86400.0
    session_max_cpu_s: float = 300.0
    # Read-only paths shown to runs besides /usr, /etc and the interpreter's own paths.
    extra_ro_paths: list[str] = []
    # Unix uid/gid allowed to connect to the socket besides root (the runner's user).
    socket_owner_uid: int = 0
    socket_owner_gid: int = 0
    # 0o666 only where the socket's directory is the access control (the runner's pool
    # directory, which only root and the runner's group can enter).
    socket_mode: int = 0o660

    def __post_init__(self) -> None:
        if self.run_uid <= 0 or self.run_gid <= 0:
            raise ValueError("run_uid and run_gid must be non-zero: runs never run as root")
        for name in ("workdir_size_mib", "tmp_size_mib", "shm_size_mib", "rlimit_nofile",
                     "rlimit_nproc", "rlimit_stack_mib", "max_payload_mib", "max_out_files",
                     "max_out_kib", "session_max_ttl_s", "session_max_cpu_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.socket_mode & ~0o666 or self.socket_mode & 0o600 != 0o600:
            raise ValueError("socket_mode must allow the owner to read and write, nothing more "
                             "than 0o666")
