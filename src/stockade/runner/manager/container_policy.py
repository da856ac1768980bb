"""What a pool container's root may do: the capabilities it keeps and the system calls it
never gets, below the run's own allow-list (sandbox/seccomp.py).

A run holds no capability and its own seccomp filter; these bound the zygote (the
container's root) and anything that would get that far, the way Docker's default profile
bounds a container's root. Root only: the profile is written under the runner's run_dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from stockade.runner.config import RunnerConfig

# What the zygote does, and no more (lxc.cap.keep drops the rest from the bounding set):
#   sys_admin         mounts, pivot_root, unshare and setns of the run's namespaces,
#                     sethostname in the run's UTS namespace
#   sys_chroot        setns into a mount namespace (each run joins the root template's)
#   setuid, setgid    a run's worker and collector take the run's uid and no groups
#   setpcap           they lock their securebits and empty their bounding set
#   kill              the zygote kills a run's processes, which run as another uid
#   chown             the zygote gives its socket to the front's group
CAPABILITIES = ("sys_admin", "sys_chroot", "setuid", "setgid", "setpcap", "kill", "chown")

CLONE_NEWUSER = 0x10000000
AF_NETLINK, NETLINK_NETFILTER = 16, 12
# LXC's seccomp v2 format: a deny-list, "[arg,value,op,mask]" conditions, errno 1 = EPERM.
SECCOMP_PROFILE = f"""\
2
denylist
reject_force_umount
[all]
# LXC's own defaults (common.seccomp)
kexec_load errno 1
open_by_handle_at errno 1
init_module errno 1
finit_module errno 1
delete_module errno 1
# no user namespace inside: a nested one is where unprivileged kernel code is reached
unshare errno 1 [0,{CLONE_NEWUSER},SCMP_CMP_MASKED_EQ,{CLONE_NEWUSER}]
clone errno 1 [0,{CLONE_NEWUSER},SCMP_CMP_MASKED_EQ,{CLONE_NEWUSER}]
# clone3 keeps its flags in memory, out of seccomp's sight: ENOSYS, so libc uses clone
clone3 errno 38
# the new mount API (the zygote uses mount(2); fsconfig was CVE-2022-0185)
fsopen errno 1
fsconfig errno 1
fsmount errno 1
fspick errno 1
move_mount errno 1
open_tree errno 1
mount_setattr errno 1
# io_uring, keyrings, eBPF, perf, userfaultfd: large attack surfaces nothing here uses
io_uring_setup errno 1
io_uring_enter errno 1
io_uring_register errno 1
add_key errno 1
request_key errno 1
keyctl errno 1
bpf errno 1
perf_event_open errno 1
userfaultfd errno 1
# netfilter's netlink (nf_tables bugs): no network device either way
socket errno 1 [0,{AF_NETLINK},SCMP_CMP_EQ][2,{NETLINK_NETFILTER},SCMP_CMP_EQ]
"""


def seccomp_profile_path(config: RunnerConfig) -> Path:
    return Path(config.run_dir) / "container.seccomp"


def write_seccomp_profile(config: RunnerConfig) -> Path:
    """The profile every pool container starts with, written afresh at each start."""
    path = seccomp_profile_path(config)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(SECCOMP_PROFILE)
    temporary.chmod(0o644)
    temporary.replace(path)
    return path


# Keys whose values add up: set them one value at a time, each appended.
LIST_KEYS = frozenset({"lxc.cap.keep", "lxc.idmap"})


def lxc_items(config: RunnerConfig) -> list[tuple[str, str]]:
    """The LXC config of a pool container's root: its capabilities and its profile."""
    return [("lxc.cap.drop", ""),  # LXC refuses a drop list beside a keep list
            *(("lxc.cap.keep", cap) for cap in CAPABILITIES),
            ("lxc.seccomp.profile", str(seccomp_profile_path(config))),
            # Without it LXC loads no profile at all when the runner already runs under a
            # filter: systemd's SystemCallFilter, or a container around the whole host.
            ("lxc.seccomp.allow_nesting", "1")]
