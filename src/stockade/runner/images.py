"""Build the sandbox container image: a Debian bookworm rootfs with python3, the sandbox
package and the preloads, shifted into the containers' uid range and never started itself.

Pool containers are overlay snapshot clones of it. Building is idempotent: an image is
named by a digest of what went into it (`stockade-sandbox-<digest>`), so a rebuild makes a
new one beside the old, which stays until no container is cloned from it any more.
An image can be exported as an archive and imported on hosts that never build one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec

import stockade
from stockade.runner.config import RunnerConfig

IMAGE_FORMAT = 2  # bump when the layout below changes (2: no set-id bits)
SUITE = "bookworm"
STAMP = "stockade-image.json"
SITE = "usr/local/lib/python{version}/dist-packages"  # Debian's sys.path, in read-only /usr
# Inside a container: the host directory bind-mounted for its zygote's config and socket.
CONTAINER_DIR = "/run/stockade"
ZYGOTE_CONFIG = f"{CONTAINER_DIR}/zygote.json"


class ImageError(RuntimeError):
    """The image could not be built; the message says which step and why."""


class Stamp(msgspec.Struct, frozen=True):
    digest: str
    built_at: float
    python: str
    packages: list[str]


def sandbox_requirements() -> list[str]:
    """The pinned packages a container needs: the sandbox's own and the preload extra."""
    wanted = []
    for requirement in importlib.metadata.requires("stockade") or []:
        spec, _, marker = requirement.partition(";")
        if not marker or 'extra == "preload"' in marker:
            wanted.append(spec.strip())
    return sorted(wanted)


# What a container needs of the package: the zygote and what it imports, nothing else.
CONTAINER_MODULES = ("__init__.py", "limits.py", "protocol.py", "result.py", "sandbox")


def _package_files() -> list[Path]:
    root = Path(stockade.__file__).parent
    return sorted(p for p in root.rglob("*.py")
                  if p.relative_to(root).parts[0] in CONTAINER_MODULES)


@functools.cache
def digest() -> str:
    """What the image is made of: format, suite, requirements and the sandbox's source
    (read once: the image a process needs is the one its own code was loaded from)."""
    h = hashlib.sha256(f"{IMAGE_FORMAT} {SUITE} {sandbox_requirements()}".encode())
    root = Path(stockade.__file__).parent
    for path in _package_files():
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def image_name(config: RunnerConfig) -> str:
    """The LXC name of the image this code needs (the sandbox's source is its digest)."""
    return f"{config.image}-{digest()[:12]}"


def image_dir(config: RunnerConfig) -> Path:
    return Path(config.lxc_path) / image_name(config)


def read_stamp(config: RunnerConfig) -> Stamp | None:
    try:
        return msgspec.json.decode((image_dir(config) / STAMP).read_bytes(), type=Stamp)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def is_current(config: RunnerConfig) -> bool:
    stamp = read_stamp(config)
    return stamp is not None and stamp.digest == digest() and (
        image_dir(config) / "rootfs" / "usr").is_dir()


def build(config: RunnerConfig, force: bool = False, log: bool = True) -> bool:
    """Build the image unless the current one matches; True if something was built."""
    if is_current(config) and not force:
        return False
    started = time.monotonic()
    lxc_path = Path(config.lxc_path)
    lxc_path.mkdir(mode=0o711, parents=True, exist_ok=True)
    staging = lxc_path / f".build-{image_name(config)}"
    remove_tree(staging)
    try:
        rootfs = _create_rootfs(staging, config.image, log)
        python = _install_sandbox(rootfs)
        _shift_ownership(rootfs, config.idmap_base)
        _install(config, rootfs)
        stamp = Stamp(digest=digest(), built_at=time.time(), python=python,
                      packages=sandbox_requirements())
        (image_dir(config) / STAMP).write_bytes(msgspec.json.encode(stamp))
    finally:
        remove_tree(staging)
    pruned = prune(config)
    if log:
        print(f"stockade: built image {image_name(config)} in "
              f"{time.monotonic() - started:.1f} s at {image_dir(config)}"
              + (f"; removed old images {', '.join(pruned)}" if pruned else ""),
              file=sys.stderr)
    return True


def archive_path(config: RunnerConfig, directory: Path) -> Path:
    return directory / f"{image_name(config)}.tar.gz"


def export(config: RunnerConfig, directory: Path) -> Path:
    """Write the current image (rootfs and stamp, owners numeric) as an archive; the host
    config is left out: `import_archive` writes it for the importing host's paths."""
    if not is_current(config):
        raise ImageError(f"image {image_name(config)} is not built: run `stockade images build`")
    target = archive_path(config, directory)
    if target.is_file():  # named by the digest: the same image, complete (renamed last)
        return target
    partial = target.with_name(f".{target.name}.partial")
    try:
        _run(["tar", "-C", str(image_dir(config)), "--create", "--file", str(partial),
              "--use-compress-program", "gzip -1", "--numeric-owner", "--xattrs", "--acls",
              "--sort=name", STAMP, "rootfs"], "tar of the image")
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def import_archive(config: RunnerConfig, archive: Path) -> bool:
    """Install an exported image unless the current one is here; True if installed. An
    archive made by other sandbox code is refused: its runner would not match it."""
    if is_current(config):
        return False
    lxc_path = Path(config.lxc_path)
    lxc_path.mkdir(mode=0o711, parents=True, exist_ok=True)
    staging = lxc_path / f".import-{image_name(config)}"
    remove_tree(staging)
    staging.mkdir(mode=0o700)
    try:
        _run(["tar", "-C", str(staging), "--extract", "--file", str(archive), "--gzip",
              "--numeric-owner", "--same-owner", "--same-permissions", "--xattrs", "--acls",
              STAMP, "rootfs"], f"extracting {archive}")
        try:
            stamp = msgspec.json.decode((staging / STAMP).read_bytes(), type=Stamp)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ImageError(f"{archive} has no valid {STAMP}: {exc}") from None
        if stamp.digest != digest():
            raise ImageError(
                f"{archive} holds sandbox image {stamp.digest[:12]}, but this stockade needs "
                f"{digest()[:12]}: export the image with the same stockade version")
        _install(config, staging / "rootfs")
        (image_dir(config) / STAMP).write_bytes(msgspec.json.encode(stamp))
    finally:
        remove_tree(staging)
    prune(config)
    return True


def prune(config: RunnerConfig) -> list[str]:
    """Remove older images that no container (of any runner on this host) is cloned from."""
    lxc_path = Path(config.lxc_path)
    in_use = set()
    for container_config in lxc_path.glob("*/config"):
        for line in container_config.read_text(errors="replace").splitlines():
            if line.startswith("lxc.rootfs.path") and "overlay:" in line:
                in_use.add(Path(line.split("overlay:", 1)[1].split(":", 1)[0]).parent.name)
    removed = []
    for old in lxc_path.glob(f"{config.image}-*"):
        if old.name != image_name(config) and old.name not in in_use and (
                old / STAMP).exists():
            remove_tree(old)
            removed.append(old.name)
    return removed


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail))


def _create_rootfs(staging: Path, name: str, log: bool) -> Path:
    """A privileged Debian rootfs from the lxc debian template (cached after the first)."""
    if shutil.which("lxc-create") is None:
        raise ImageError("lxc-create is missing: install the lxc and lxc-templates packages")
    if log:
        print("stockade: creating the sandbox rootfs (lxc-create -t debian; the first time "
              "downloads Debian packages, ~1-2 min)", file=sys.stderr)
    staging.mkdir(mode=0o700)
    _run(["lxc-create", "-P", str(staging), "-n", name, "-t", "debian", "--",
          "-r", SUITE, "--packages=python3"], "lxc-create -t debian",
         env={**os.environ, "LANG": "C.UTF-8"})
    return staging / name / "rootfs"


def _install_sandbox(rootfs: Path) -> str:
    """Put the pinned wheels and the sandbox package on the rootfs python's path."""
    python = os.readlink(rootfs / "usr/bin/python3").removeprefix("python")  # e.g. "3.11"
    site = rootfs / SITE.format(version=python)
    site.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
          "--disable-pip-version-check", "--no-compile", "--only-binary=:all:",
          "--implementation", "cp", "--python-version", python,
          "--platform", f"manylinux2014_{os.uname().machine}",
          "--platform", f"manylinux_2_28_{os.uname().machine}",
          "--target", str(site), *sandbox_requirements()], "pip install into the rootfs")
    package_root = Path(stockade.__file__).parent
    target = site / "stockade"
    remove_tree(target)
    for path in _package_files():
        dest = target / path.relative_to(package_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    # Compile and smoke-test with the rootfs's own interpreter.
    _run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q",
          f"/{site.relative_to(rootfs)}"], "compileall in the rootfs")
    _run(["chroot", str(rootfs), "/usr/bin/python3", "-I", "-c",
          "import stockade.sandbox.zygote, numpy, pandas"], "import check in the rootfs")
    for entry in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        entry.unlink()
    return python


def _shift_ownership(rootfs: Path, base: int) -> None:
    """Map every owner into the containers' range (uid 0 becomes `base`) and clear every
    set-id bit: nothing in a container may gain privileges by exec (no_new_privs already
    makes them inert), and hosts whose runner unit has RestrictSUIDSGID can import it."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            if st.st_uid < base:
                os.lchown(path, st.st_uid + base, st.st_gid + base)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def container_config(config: RunnerConfig, rootfs: Path) -> str:
    """The base container's config; pool clones add their socket mount and cgroup caps."""
    base, size = config.idmap_base, config.idmap_size
    return "\n".join([
        "# Written by `stockade images build`. Never started: pool containers are",
        "# overlay snapshot clones of it.",
        "lxc.include = /usr/share/lxc/config/common.conf",
        "lxc.include = /usr/share/lxc/config/userns.conf",
        "lxc.arch = linux64",
        f"lxc.rootfs.path = dir:{rootfs}",
        "lxc.uts.name = sandbox",
        f"lxc.idmap = u 0 {base} {size}",
        f"lxc.idmap = g 0 {base} {size}",
        # No network device at all: only the container's own loopback.
        "lxc.net.0.type = empty",
        "lxc.mount.auto =",
        "lxc.mount.auto = proc:mixed sys:ro cgroup:rw:force",
        # A fully visible proc lets each run mount a fresh /proc for its pid namespace.
        "lxc.mount.entry = proc dev/.lxc/proc proc create=dir,optional 0 0",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 0",
        # The zygote's stderr, capped: LXC keeps at most this much of the console.
        "lxc.console.size = 1MB",
        # The zygote is the container's init: no services, nothing else to attack.
        f"lxc.init.cmd = /usr/bin/python3 -I -m stockade.sandbox.zygote --config {ZYGOTE_CONFIG}",
        "lxc.init.uid = 0",
        "lxc.signal.halt = SIGTERM",
        "lxc.signal.stop = SIGKILL",
        "",
    ])


def _install(config: RunnerConfig, rootfs: Path) -> None:
    """Put the new rootfs in place under its own name; clones of other images go on."""
    final = image_dir(config)
    remove_tree(final)  # only a half-built one of the same digest can be here
    final.mkdir(mode=0o711)
    rootfs.rename(final / "rootfs")
    (final / "config").write_text(container_config(config, final / "rootfs"))


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
