"""Pool containers: overlay snapshot clones of the sandbox image, each running one zygote.

Root only (LXC, cgroups, /etc/subuid). Blocking calls: the pool runs them in a worker
thread. Every path that creates something has a path that removes it, including the
empty `lxc.monitor.*` cgroups the LXC bindings leave behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import lxc  # type: ignore[import-untyped]
import msgspec

from stockade import environment
from stockade.limits import LimitPolicy
from stockade.runner.config import SESSION_TTL_BACKSTOP_S, RunnerConfig
from stockade.runner.manager import apparmor, container_policy, images, layout
from stockade.runner.manager.idmap import RangeError, Ranges, Views, root_covers, subid_entry
from stockade.runner.manager.lxc_cgroups import (
    cgroup_dirs,
    cgroup_version,
    lxc_cgroup_items,
    reap_zombies,
    remove_lxc_cgroups,
    return_home,
)
from stockade.sandbox import libc
from stockade.sandbox.config import DEFAULT_PRELOAD, SandboxConfig

# For a zygote to serve after its container starts: a guard against a hung one, not a
# pace. Natively a full zygote serves within seconds; in a VM without KVM, five of them
# importing numpy, pandas and pyarrow at once took longer than a minute each.
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0  # for a SIGKILLed container to stop
CGROUP_TIMEOUT_S = 5.0  # for LXC's monitor process to leave its cgroup


class ContainerError(RuntimeError):
    """A container could not be made, started or removed."""


def ensure_subid_ranges(config: RunnerConfig) -> None:
    """Give root the containers' uid/gid ranges, which newuidmap checks, unless a line of
    root's already covers them all (the lxc_host role gives root a larger span)."""
    line = f"root:{config.idmap_base}:{config.idmap_span}"
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        current = path.read_text().splitlines() if path.exists() else []
        if any(root_covers(subid_entry(entry), config.idmap_base, config.idmap_span)
               for entry in current):
            continue
        try:
            path.write_text("\n".join([*current, line]) + "\n")
        except OSError as exc:
            raise ContainerError(f"root needs {line} in {path} ({exc.strerror}): add it, or "
                                 "lower idmap_ranges or the pool sizes") from None


def zygote_config(config: RunnerConfig, preload: list[str]) -> SandboxConfig:
    return SandboxConfig(
        socket_path=layout.ZYGOTE_SOCKET,
        state_dir=layout.ZYGOTE_STATE_DIR,
        preload=[*DEFAULT_PRELOAD, *preload],
        limits=LimitPolicy(default=config.limits.default, maximum=config.limits.maximum),
        socket_mode=0o666,
        max_out_files=config.max_out_files,
        max_out_kib=config.max_out_kib,
        session_max_ttl_s=config.sessions.max_ttl_s + SESSION_TTL_BACKSTOP_S,
        session_max_cpu_s=config.sessions.max_cpu_total_s,
        # The container has no network device and its runs never overlap, so a network
        # namespace per run would add nothing but the kernel's costly netns teardown.
        isolate_network=False,
    )


def apparmor_profile(enabled: Path = apparmor.ENABLED,
                     profiles: Path = apparmor.PROFILES) -> str | None:
    """The AppArmor profile for pool containers: None where the kernel does not enforce
    AppArmor (LXC ignores the key there), else stockade's, which must be loaded."""
    if not apparmor.enforced(enabled):
        return None
    try:
        names = apparmor.loaded(profiles)
    except OSError as exc:
        raise ContainerError(f"the kernel enforces AppArmor, but {profiles} cannot be read "
                             f"({exc.strerror}): is securityfs mounted?") from None
    if apparmor.PROFILE not in names:
        raise ContainerError(
            f"the kernel enforces AppArmor and the profile {apparmor.PROFILE} is not loaded "
            "(LXC's default container profile forbids the mounts each run needs): "
            + apparmor.HOW_TO_LOAD)
    return apparmor.PROFILE


class Containers:
    def __init__(self, config: RunnerConfig, runner_gid: int = 0) -> None:
        self.config = config
        self.runner_gid = runner_gid
        self.lxc_path = config.lxc_path
        self.socket_root = config.pool_socket_dir
        self.cgroup_version = cgroup_version()
        self.apparmor_profile = apparmor_profile()
        # Children that are not LXC monitors (the HTTP front): never reaped here.
        self.keep_children: set[int] = set()
        self.home = cgroup_dirs()
        self.ranges = Ranges(config.idmap_base, config.idmap_size, config.uid_ranges)
        self.views = Views(config.idmap_base, config.idmap_size)

    def close(self) -> None:
        """Release the user namespaces of the image's views (every container is gone)."""
        self.views.close()

    def root_uid(self, name: str) -> int:
        """Container `name`'s root on the host: the first id of its range."""
        return self.ranges.root(self.ranges.held[name])

    def socket_path(self, name: str) -> Path:
        return layout.host_socket(self.config, name)

    def _limits(self) -> list[tuple[str, str]]:
        memory = self.config.container_memory_mib << 20
        pids = self.config.container_pids
        period = 100_000
        quota = int(self.config.container_cpus * period)
        if self.cgroup_version == 1:
            limits = [("lxc.cgroup.memory.limit_in_bytes", str(memory)),
                      ("lxc.cgroup.pids.max", str(pids)),
                      ("lxc.cgroup.cpu.cfs_period_us", str(period)),
                      ("lxc.cgroup.cpu.cfs_quota_us", str(quota))]
            if Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists():
                # No swap beyond the memory limit, where the kernel accounts swap at all.
                limits.append(("lxc.cgroup.memory.memsw.limit_in_bytes", str(memory)))
            return limits
        return [("lxc.cgroup2.memory.max", str(memory)),
                ("lxc.cgroup2.memory.swap.max", "0"),
                ("lxc.cgroup2.pids.max", str(pids)),
                ("lxc.cgroup2.cpu.max", f"{quota} {period}")]

    def prepare_directories(self) -> None:
        """The run and pool directories: containers may pass through the pool directory to
        their own, but not list it. Idempotent; also repairs them if removed while up."""
        Path(self.config.run_dir).mkdir(mode=0o755, parents=True, exist_ok=True)
        self.socket_root.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.socket_root, 0o711)  # noqa: S103 - each container directory guards itself

    def _socket_dir(self, name: str, preload: list[str], root: int) -> Path:
        """The container's only window to the host: its zygote's config and socket. Owned
        by the container's root; only the runner's group may enter besides."""
        self.prepare_directories()
        directory = layout.host_dir(self.config, name)
        images.remove_tree(directory)
        directory.mkdir(mode=0o710)
        (directory / layout.ZYGOTE_CONFIG_NAME).write_bytes(
            msgspec.json.encode(zygote_config(self.config, preload)))
        os.chown(directory, root, self.runner_gid)
        return directory

    def start(self, name: str, env: str, preload: list[str]) -> None:
        """Clone the environment's image, configure and start the clone (its zygote is
        still loading)."""
        chosen = environment.get(env)
        image = images.image_name(self.config, chosen)
        base = lxc.Container(image, self.lxc_path)
        if not base.defined:
            raise ContainerError(images.missing_message(self.config, chosen))
        try:
            root = self.ranges.take(name)
            directory = self._socket_dir(name, preload, root)
            container = base.clone(name, config_path=self.lxc_path,
                                   flags=lxc.LXC_CLONE_SNAPSHOT, bdevtype="overlayfs")
            if not container:
                raise ContainerError(f"cannot clone {image} into {name}")
            _shift_range(Path(self.lxc_path) / name, self.config.idmap_base, root,
                         self.config.idmap_size)
            rootfs = self._mount_root(name, container.get_config_item("lxc.rootfs.path"),
                                      root)
            size = self.config.idmap_size
            mount_point = layout.CONTAINER_DIR.lstrip("/")
            if not container.clear_config_item("lxc.idmap"):
                raise ContainerError(f"LXC would not clear {name}'s idmap")
            items = [("lxc.rootfs.path", str(rootfs)),  # a directory (LXC refuses "dir:")
                     ("lxc.idmap", f"u 0 {root} {size}"), ("lxc.idmap", f"g 0 {root} {size}"),
                     ("lxc.mount.entry", f"{directory} {mount_point} none bind,create=dir 0 0"),
                     ("lxc.uts.name", layout.HOSTNAME),
                     ("lxc.console.logfile", str(layout.console_log(self.config, name))),
                     *lxc_cgroup_items(self.config.container_prefix, name),
                     *container_policy.lxc_items(self.config),
                     *self._limits()]
            if self.apparmor_profile:
                items.append(("lxc.apparmor.profile", self.apparmor_profile))
            for key, value in items:
                add = (container.append_config_item if key in container_policy.LIST_KEYS
                       else container.set_config_item)
                if not add(key, value):
                    raise ContainerError(f"LXC refused {key} = {value}")
            container.save_config()
            # Read back: the clone's object still holds its overlay storage type.
            started = lxc.Container(name, self.lxc_path).start()
            return_home(self.home)
            if not started:
                raise ContainerError(f"container {name} did not start")
        except BaseException:
            self.destroy(name)
            raise

    def _rootfs(self, name: str) -> Path:
        return Path(self.lxc_path) / name / "rootfs"

    def _view(self, name: str) -> Path:
        return Path(self.lxc_path) / name / "image"

    def _mount_root(self, name: str, clone_rootfs: str, root: int) -> Path:
        """Mount the clone's overlay (`[overlay:]LOWER:UPPER`, as LXC made it) ourselves,
        its layers named by descriptor (`/proc/self/fd/N`): the overlay's options are all a
        mount table shows of it, and a run sees /usr's, so no host path shows there. Its
        lower layer is the image itself in the first uid range, else the image's view
        idmapped onto the container's range."""
        layers = clone_rootfs.removeprefix("overlayfs:").removeprefix("overlay:").split(":")
        if len(layers) != 2 or not all(layer.startswith("/") for layer in layers):
            raise ContainerError(f"{name}'s clone is not an overlay: {clone_rootfs}")
        lower, upper = layers
        if root != self.config.idmap_base:
            view = self._view(name)
            view.mkdir(mode=0o755, exist_ok=True)
            try:
                self.views.mount(Path(lower), root, view)
            except RangeError as exc:
                raise ContainerError(str(exc)) from None
            lower = str(view)
        work = Path(upper).parent / "work"
        if not work.exists():
            work.mkdir(mode=0o700)
            os.chown(work, root, root)
        rootfs = self._rootfs(name)
        rootfs.mkdir(mode=0o755, exist_ok=True)
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fds = [os.open(path, flags) for path in (lower, upper, work)]
        try:
            named = zip(("lowerdir", "upperdir", "workdir"), fds, strict=True)
            libc.mount("stockade", str(rootfs), "overlay", 0,
                       ",".join(f"{key}=/proc/self/fd/{fd}" for key, fd in named))
        except OSError as exc:
            raise ContainerError(f"cannot mount {name}'s root: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        return rootfs

    def _unmount_root(self, name: str) -> None:
        """Whatever is mounted in the container's directory (its overlay root, the image's
        view below it), deepest first."""
        top = Path(self.lxc_path) / name
        for point in images.mounts_under(top):
            with contextlib.suppress(OSError):  # checked below
                libc.umount2(point, libc.MNT_DETACH)
        left = images.mounts_under(top)
        if left:
            raise ContainerError(f"{', '.join(left)} still mounted")

    def _console_tail(self, name: str) -> str:
        try:
            with layout.console_log(self.config, name).open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 1500))
                return log.read().decode(errors="replace").strip() or "(no console output)"
        except OSError:
            return "(no console log)"

    def wait_until_serving(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the container's zygote accepts a connection (no LXC call inside but
        a state check, so it may run beside the LXC thread)."""
        path = self.socket_path(name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
            if not lxc.Container(name, self.lxc_path).running:
                raise ContainerError(f"container {name} stopped before its zygote served "
                                     f"(is the image current? `make sandbox-image`): "
                                     f"{self._console_tail(name)}")
            time.sleep(0.01)
        raise ContainerError(f"the zygote in {name} did not serve within {timeout_s} s")

    def destroy(self, name: str) -> None:
        """Stop and remove a container and everything made for it. Idempotent."""
        container = lxc.Container(name, self.lxc_path)
        if container.running:
            # SIGKILL to its init takes the whole container at once. (lxc's stop() gets
            # there too, and wait("STOPPED") sees it, each only after ~0.5 s.)
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.init_pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while container.running and time.monotonic() < deadline:
                time.sleep(0.005)
            if container.running:
                container.stop()
        self._unmount_root(name)  # before LXC removes the rootfs directory
        if container.defined and not container.destroy():
            raise ContainerError(f"cannot destroy container {name}")
        try:
            images.remove_tree(Path(self.lxc_path) / name)
            images.remove_tree(layout.host_dir(self.config, name))
        except images.ImageError as exc:
            raise ContainerError(str(exc)) from None
        busy = remove_lxc_cgroups(name, self.config.container_prefix,
                                  timeout_s=CGROUP_TIMEOUT_S,
                                  between=lambda: reap_zombies(self.keep_children))
        if busy:
            raise ContainerError(f"cgroups of {name} still busy: {', '.join(busy)}")
        self.ranges.give_back(name)  # nothing of it is left to hold an id of its range

    def existing(self) -> list[str]:
        names = lxc.list_containers(config_path=self.lxc_path)
        return sorted(n for n in names if n.startswith(self.config.container_prefix))

    def reconcile(self) -> list[str]:
        """Remove what a crashed runner left: containers, sockets and cgroups of the pool."""
        left = self.existing()
        for name in left:
            self.destroy(name)
        if self.socket_root.is_dir():
            for entry in self.socket_root.iterdir():
                if entry.name.startswith(self.config.container_prefix):
                    images.remove_tree(entry)
        remove_lxc_cgroups(self.config.container_prefix, self.config.container_prefix,
                           prefix=True)
        return left


def _shift_range(top: Path, base: int, root: int, size: int) -> None:
    """Move what a clone made (owned in the first range, as the image is) into the range
    that starts at `root`; other owners (root's config files) stay."""
    if root == base:
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for entry in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, entry) if entry else dirpath
            st = os.lstat(path)
            uid = st.st_uid - base + root if base <= st.st_uid < base + size else st.st_uid
            gid = st.st_gid - base + root if base <= st.st_gid < base + size else st.st_gid
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(path, uid, gid)
