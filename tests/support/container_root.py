"""TEST ONLY: what a process with a pool container's root can do, asked from inside.

`probe(config, name)` runs PROBE in the container with `lxc-attach`, as the container's
root (uid 0 of its user namespace), under what LXC gives an attached process: the
container's namespaces, cgroup, capability bounding set, seccomp profile and AppArmor
profile. `elevated=True` asks LXC to skip its capability and LSM/seccomp restrictions: the
control that shows each probe would succeed without them.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from stockade.runner.config import RunnerConfig

# x86_64 numbers; each call is harmless where it succeeds (a descriptor closed at exit).
PROBE = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(number, *args):
    ctypes.set_errno(0)
    if libc.syscall(number, *args) == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "allowed"

def in_child(number, *args):
    # unshare changes the caller: try it in a child that exits at once
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, call(number, *args).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return os.read(read, 64).decode()

io_uring_params = ctypes.create_string_buffer(120)
perf_attr = ctypes.create_string_buffer(128)
perf_attr[0:4] = (1).to_bytes(4, "little")      # PERF_TYPE_SOFTWARE
perf_attr[4:8] = (128).to_bytes(4, "little")    # size
perf_attr[40:48] = (1 << 5 | 1 << 6).to_bytes(8, "little")  # exclude_kernel, exclude_hv
seen = {
    "unshare_user": in_child(272, 0x10000000),
    "fsopen": call(430, b"tmpfs", 0),
    "open_tree": call(428, -100, b"/", 0),
    "move_mount": call(429, -1, b"", -1, b"", 0),
    "io_uring_setup": call(425, 1, io_uring_params),
    "keyctl": call(250, 0, -3, 0),
    "add_key": call(248, b"user", b"probe", b"x", 1, -3),
    "userfaultfd": call(323, 1),                  # UFFD_USER_MODE_ONLY
    "perf_event_open": call(298, perf_attr, 0, -1, -1, 0),
    "bpf": call(321, 0, None, 0),
    "clone3": call(435, None, 0),
}
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12).close()  # NETLINK_NETFILTER
    seen["netfilter_netlink"] = "allowed"
except OSError as exc:
    seen["netfilter_netlink"] = errno.errorcode.get(exc.errno, str(exc.errno))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
seen.update(uid=os.getuid(), cap_bnd=int(status["CapBnd"], 16),
            seccomp=status["Seccomp"].strip())
print(json.dumps(seen))
"""


def probe(config: RunnerConfig, name: str, elevated: bool = False) -> dict[str, Any]:
    argv = ["lxc-attach", "-P", config.lxc_path, "-n", name, "--clear-env",
            *(["--elevated-privileges=CAP|LSM"] if elevated else []),
            "--", "/usr/bin/python3", "-I", "-c", PROBE]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"lxc-attach into {name} failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen
