"""What a runner or a zygote may leave behind, found on the host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from stockade.runner.config import RunnerConfig
from stockade.runner.manager.containers import Containers
from stockade.runner.manager.lxc_cgroups import pool_cgroup
from support.sandbox import Sandbox


def runner_leftovers(config: RunnerConfig) -> list[str]:
    """Containers, sockets, cgroups, mounts and processes of a runner's pool that still
    exist."""
    found = [f"container {name}" for name in Containers(config).existing()]
    pool_dir = config.pool_socket_dir
    if pool_dir.is_dir():
        found += [f"socket dir {p}" for p in pool_dir.iterdir()]
    if Path(config.run_dir).exists():
        found.append(f"run dir {config.run_dir}")
    prefix = config.container_prefix
    pool = pool_cgroup(prefix)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for parent in (hierarchy, *(p for p in hierarchy.glob("*") if p.is_dir())):
            found += [f"cgroup {p}" for p in parent.glob(f"lxc.*.{prefix}*")]
            found += [f"cgroup {p}" for p in (parent / pool, parent / f"{pool}.monitor")
                      if p.is_dir()]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(f"{config.lxc_path}/{prefix}"):
            found.append(f"mount {point}")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue
        if f"lxc.payload.{prefix}" in cgroups or f":/{pool}/" in cgroups:
            found.append(f"process {proc.name}")
    return sorted(set(found))


PLANT = """
import os, time
for path in ("/box/left", "/tmp/left", "/dev/shm/left"):
    try:
        with open(path, "w") as f:
            f.write("from the last run")
    except OSError:
        pass  # a weakened sandbox may lack one of them
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
print(os.getpid())
"""
LOOK = """
import json, os
left = [p for p in ("/box/left", "/tmp/left", "/dev/shm/left") if os.path.exists(p)]
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({"files": left, "pids": pids, "me": os.getpid()}))
"""


def host_processes_of(uid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        uids = next((line.split()[1:] for line in lines if line.startswith("Uid:")), [])
        if str(uid) in uids:
            found.append(int(status.parent.name))
    return found


def leftovers_seen(box: Sandbox) -> list[str]:
    """Plant files and a daemon in one run; report what the next run or the host sees."""
    planted = box.run(PLANT)
    assert planted.status == "ok", planted
    seen = json.loads(box.run(LOOK).stdout)
    problems = [f"file {f}" for f in seen["files"]]
    problems += [f"pid {p}" for p in seen["pids"] if p not in (1, seen["me"])]
    survivors = host_processes_of(box.config.run_uid)
    problems += [f"host pid {p}" for p in survivors]
    for pid in survivors:  # a weakened sandbox lets them live: don't leave them behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in ("/tmp/left", "/dev/shm/left"):  # a weakened zygote may have written these
        Path(path).unlink(missing_ok=True)
    return problems
