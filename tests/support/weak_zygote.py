"""TEST ONLY: a zygote with one confinement layer switched off.

Lives under tests/, is never installed, and works by replacing one step in this process
before the zygote starts: production code has no switch for it. The layer tests use it to
show that the hostile battery notices when each layer alone is missing.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from stockade.sandbox import cgroups, confine, family, libc, worker, zygote

WORKER_STEPS = {"identity", "securebits", "capabilities", "no_new_privs", "seccomp",
                "environment"}
NAMESPACES = {"ipc": libc.CLONE_NEWIPC, "uts": libc.CLONE_NEWUTS, "net": libc.CLONE_NEWNET}


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


def _host_workdir(plan: confine.RootPlan) -> None:
    # No private root: the run works in a host directory (inside the zygote's state
    # directory, which the test removes) and sees the host's files.
    path = tempfile.mkdtemp(prefix="box-", dir=os.path.dirname(plan.mount_point))
    os.chmod(path, 0o777)  # noqa: S103 - the point of this weakened zygote
    os.chdir(path)


def weaken(layer: str) -> None:
    if layer in WORKER_STEPS:
        original = worker.worker_steps
        worker.worker_steps = lambda plan, keep: [  # type: ignore[assignment]
            (name, step) for name, step in original(plan, keep) if name != layer]
    elif layer == "fds":  # both the init's and the worker's closing
        confine.close_inherited_fds = _nothing  # type: ignore[assignment]
    elif layer == "rlimits":
        worker.apply_rlimits = _nothing  # type: ignore[assignment]
    elif layer == "pid":
        confine.enter_new_pid_namespace_for_children = _nothing  # type: ignore[assignment]
    elif layer in NAMESPACES:
        flag = NAMESPACES[layer]
        original_flags = confine.namespace_flags
        confine.namespace_flags = lambda net: original_flags(net) & ~flag  # type: ignore[assignment]
    elif layer == "filesystem":
        confine.join_root_template = _nothing  # type: ignore[assignment]
        confine.enter_private_root = _host_workdir  # type: ignore[assignment]
    elif layer == "memory":
        cgroups.RunCgroup.set_memory_limit = _nothing  # type: ignore[assignment]
    elif layer == "pids":
        cgroups.RunCgroup.set_pids_limit = _nothing  # type: ignore[assignment]
    elif layer == "unreapable":  # not a layer: a zygote that cannot prove a run is gone
        family.Family.reap = lambda *_args, **_kwargs: False  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown layer {layer!r}")


if __name__ == "__main__":
    weaken(sys.argv[1])
    raise SystemExit(zygote.main(sys.argv[2:]))
