"""The sandbox container image: a Debian bookworm rootfs with python3, the sandbox package
and the preloads, shifted into the containers' uid range and never started itself.

Packer builds the rootfs (`make sandbox-image`: packer/sandbox.pkr.hcl, provisioned by
ansible/sandbox.yml from what `stage` writes); `import_rootfs` checks it carries this
code, shifts it and installs it. Pool containers are overlay snapshot clones of it. An
image is named by a digest of what went into it (`stockade-sandbox-<digest>`), so a new
one goes beside the old, which stays until no container is cloned from it any more.
Hosts get it as the archive `export` writes and `import_archive` installs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

import stockade
from stockade.runner.config import RunnerConfig
from stockade.runner.manager import layout

# Part of the digest: bump it when the recipe changes (packer/sandbox.pkr.hcl,
# ansible/sandbox.yml), which the runner cannot see. 2: no set-id bits; 3: built by Packer;
# 4: catatonit, every run's init; 5: matplotlib's font cache.
IMAGE_FORMAT = 5
SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's: the wheels are downloaded for it
STAMP = "stockade-image.json"
SITE = "usr/local/lib/python{version}/dist-packages"  # Debian's sys.path, in read-only /usr


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


def package_root() -> Path:
    return Path(stockade.__file__).parent


def package_files() -> list[Path]:
    root = package_root()
    return sorted(p for p in root.rglob("*.py")
                  if p.relative_to(root).parts[0] in CONTAINER_MODULES)


@functools.cache
def digest() -> str:
    """What the image is made of: format, suite, requirements and the sandbox's source
    (read once: the image a process needs is the one its own code was loaded from)."""
    h = hashlib.sha256(f"{IMAGE_FORMAT} {SUITE} {sandbox_requirements()}".encode())
    root = package_root()
    for path in package_files():
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


def stage(directory: Path) -> Path:
    """Everything the Packer build puts into the rootfs: the pinned wheels (and pip's own,
    which runs from its wheel, so the image needs no pip package) and the sandbox's
    sources, exactly the files the digest is made of."""
    remove_tree(directory)
    wheels = directory / "wheels"
    wheels.mkdir(parents=True)
    requirements = sandbox_requirements()
    (wheels / "requirements.txt").write_text("\n".join(requirements) + "\n")
    machine = os.uname().machine
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-input",
          "--disable-pip-version-check", "--only-binary=:all:", "--implementation", "cp",
          "--python-version", PYTHON, "--platform", f"manylinux2014_{machine}",
          "--platform", f"manylinux_2_28_{machine}", "--dest", str(wheels),
          f"pip=={importlib.metadata.version('pip')}", *requirements], "pip download")
    for path in package_files():
        dest = directory / "stockade" / path.relative_to(package_root())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return directory


def import_rootfs(config: RunnerConfig, tarball: Path, force: bool = False) -> bool:
    """Install the rootfs Packer exported (`./rootfs/...`, privileged owners) as the image
    unless the current one is here; True if installed. Refused unless its sandbox sources
    are this code's, byte for byte: the digest it is named by says they are."""
    if is_current(config) and not force:
        return False
    with _unpacked(config, tarball, "rootfs") as staging:
        rootfs = staging / "rootfs"
        python = _check_rootfs(rootfs)
        _shift_ownership(rootfs, config.idmap_base)
        _install(config, rootfs)
        stamp = Stamp(digest=digest(), built_at=time.time(), python=python,
                      packages=sandbox_requirements())
        (image_dir(config) / STAMP).write_bytes(msgspec.json.encode(stamp))
    prune(config)
    return True


@contextlib.contextmanager
def _unpacked(config: RunnerConfig, tarball: Path, purpose: str,
              *members: str) -> Iterator[Path]:
    """`tarball` extracted with its owners and modes into a staging directory beside the
    images (so installing is a rename), removed again on the way out."""
    lxc_path = Path(config.lxc_path)
    lxc_path.mkdir(mode=0o711, parents=True, exist_ok=True)
    staging = lxc_path / f".{purpose}-{image_name(config)}"
    remove_tree(staging)
    staging.mkdir(mode=0o700)
    try:
        _run(["tar", "-C", str(staging), "--extract", "--file", str(tarball), "--gzip",
              "--numeric-owner", "--same-owner", "--same-permissions", "--xattrs", "--acls",
              *members], f"extracting {tarball}")
        yield staging
    finally:
        remove_tree(staging)


def _check_rootfs(rootfs: Path) -> str:
    """The rootfs's python version, once its sandbox sources are known to be this code's."""
    try:
        python = os.readlink(rootfs / "usr/bin/python3").removeprefix("python")
    except OSError:
        raise ImageError(f"{rootfs.parent} holds no Debian rootfs with python3") from None
    if not (rootfs / "usr/bin/catatonit").is_file():
        raise ImageError(f"{rootfs.parent} has no /usr/bin/catatonit, every run's init: build "
                         "it from this checkout (`make sandbox-image`)")
    installed = rootfs / SITE.format(version=python) / "stockade"
    for path in package_files():
        copy = installed / path.relative_to(package_root())
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            raise ImageError(f"the rootfs's {copy.relative_to(rootfs)} is not this stockade's "
                             f"{path.name}: build it from this checkout (`make sandbox-image`)")
    return python


def archive_path(config: RunnerConfig, directory: Path) -> Path:
    return directory / f"{image_name(config)}.tar.gz"


def export(config: RunnerConfig, directory: Path) -> Path:
    """Write the current image (rootfs and stamp, owners numeric) as an archive; the host
    config is left out: `import_archive` writes it for the importing host's paths."""
    if not is_current(config):
        raise ImageError(f"image {image_name(config)} is not installed: run `make sandbox-image`")
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
    with _unpacked(config, archive, "import", STAMP, "rootfs") as staging:
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
    prune(config)
    return True


def prune(config: RunnerConfig) -> list[str]:
    """Remove older images that no container (of any runner on this host) is cloned from."""
    lxc_path = Path(config.lxc_path)
    in_use = set()
    for depends in lxc_path.glob("*/lxc_rdepends"):  # LXC's: "<lxc path>\n<clone source>\n"
        lines = depends.read_text(errors="replace").splitlines()
        if len(lines) >= 2:
            in_use.add(lines[1])
    removed = []
    for old in lxc_path.glob(f"{config.image}-*"):
        if old.name != image_name(config) and old.name not in in_use and (
                old / STAMP).exists():
            remove_tree(old)
            removed.append(old.name)
    return removed


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail))


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
        "# Written by `stockade images`. Never started: pool containers are",
        "# overlay snapshot clones of it.",
        "lxc.include = /usr/share/lxc/config/common.conf",
        "lxc.include = /usr/share/lxc/config/userns.conf",
        "lxc.arch = linux64",
        f"lxc.rootfs.path = dir:{rootfs}",
        f"lxc.uts.name = {layout.HOSTNAME}",
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
        "lxc.init.cmd = /usr/bin/python3 -I -m stockade.sandbox.zygote "
        f"--config {layout.ZYGOTE_CONFIG}",
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


def mounts_under(path: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest first. (Not
    os.path.ismount: a bind mount of the same filesystem looks like a plain directory.)"""
    top = os.path.realpath(path)
    points = []
    for line in Path(mountinfo).read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == top or point.startswith(top + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree, never through a mount: a tree with something
    mounted in it (a container's view of the image, say) is refused whole."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        mounted = mounts_under(path)
        if mounted:
            raise ImageError(f"not removing {path}: {', '.join(mounted)} is mounted there")
        shutil.rmtree(path, ignore_errors=True)
