"""Sandbox container images, one per environment (stockade/environment.py): a Debian
rootfs with that release's python3, the environment's locked wheels and the sandbox
package, shifted into the containers' uid range and never started itself.

Packer builds each rootfs (`make sandbox-image`: packer/sandbox.pkr.hcl, provisioned by
ansible/sandbox.yml from what `stage` writes); `import_rootfs` checks it carries this code
and exactly its lock's packages, shifts it and installs it. Pool containers are overlay
snapshot clones of it. An image is named by its environment and a digest of what went
into it (`stockade-sandbox-<environment>-<digest>`), so a new lock or new sandbox code
builds a new image beside the old, which stays until no container is cloned from it any
more. Hosts get it as the archive `export` writes and `import_archive` installs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

import stockade
from stockade import environment
from stockade.environment import Environment
from stockade.runner.config import RunnerConfig
from stockade.runner.manager import layout

# Part of the digest: bump it when the recipe changes (packer/sandbox.pkr.hcl,
# ansible/sandbox.yml), which the runner cannot see. 2: no set-id bits; 3: built by Packer;
# 4: catatonit, every run's init; 5: matplotlib's font cache; 6: one image per environment,
# its wheels installed from a hash-locked requirements file.
IMAGE_FORMAT = 6
STAMP = "stockade-image.json"
SITE = "usr/local/lib/python{version}/dist-packages"  # Debian's sys.path, in read-only /usr
DPKG_STATUS = "var/lib/dpkg/status"


class ImageError(RuntimeError):
    """The image could not be built; the message says which step and why."""


class Stamp(msgspec.Struct, frozen=True):
    digest: str
    built_at: float
    python: str  # the interpreter's full version, as Debian packaged it ("3.13.5")
    packages: list[str]  # name==version, as locked
    environment: str = ""


# What a container needs of the package: the zygote and what it imports, nothing else.
CONTAINER_MODULES = ("__init__.py", "limits.py", "protocol.py", "result.py", "sandbox")


def package_root() -> Path:
    return Path(stockade.__file__).parent


def package_files() -> list[Path]:
    root = package_root()
    return sorted(p for p in root.rglob("*.py")
                  if p.relative_to(root).parts[0] in CONTAINER_MODULES)


@functools.cache
def digest(env: Environment) -> str:
    """What the environment's image is made of: the format, the release and its Python,
    the lock and the sandbox's source (read once: the image a process needs is the one its
    own code was loaded from)."""
    d = env.definition
    h = hashlib.sha256(f"{IMAGE_FORMAT} {env.name} {d.suite} {d.python}\0".encode())
    h.update(env.lock_text().encode())
    root = package_root()
    for path in package_files():
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def image_name(config: RunnerConfig, env: Environment) -> str:
    """The LXC name of the environment's image this code needs."""
    return f"{config.image}-{env.name}-{digest(env)[:12]}"


def _image_name_pattern(config: RunnerConfig, env: str) -> str:
    """A regex of the names `image_name` gives, for environments matching regex `env`."""
    return rf"{re.escape(config.image)}-{env}-[0-9a-f]{{12}}"


def image_dir(config: RunnerConfig, env: Environment) -> Path:
    return Path(config.lxc_path) / image_name(config, env)


def read_stamp(directory: Path) -> Stamp | None:
    try:
        return msgspec.json.decode((directory / STAMP).read_bytes(), type=Stamp)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def is_current(config: RunnerConfig, env: Environment) -> bool:
    stamp = read_stamp(image_dir(config, env))
    return stamp is not None and stamp.digest == digest(env) and (
        image_dir(config, env) / "rootfs" / "usr").is_dir()


def missing_message(config: RunnerConfig, env: Environment) -> str:
    """Why an environment cannot be served, and how to build what it needs."""
    named = re.compile(_image_name_pattern(config, re.escape(env.name)))
    older = sorted(p.name for p in Path(config.lxc_path).glob(f"{config.image}-{env.name}-*")
                   if named.fullmatch(p.name) and (p / STAMP).exists())
    found = (f" (this host has {', '.join(older)}, built from another lock or sandbox code)"
             if older else "")
    return (f"environment {env.name} needs the image {image_name(config, env)}, made of its "
            f"lock and this stockade's sandbox code{found}: build it with `make sandbox-image` "
            f"(or `make environment ENV={env.name}`), or import the archive `stockade images "
            "export` wrote with the same stockade version")


def stage(env: Environment, directory: Path) -> Path:
    """Everything the Packer build puts into the environment's rootfs: its locked wheels,
    each checked against its hash (and pip's own, the installer, which runs from its wheel
    and is not installed), what the build checks, and the sandbox's sources: exactly the
    files the digest is made of."""
    remove_tree(directory)
    wheels = directory / "wheels"
    wheels.mkdir(parents=True)
    lock = env.lock_text()
    pins = environment.parse_lock(lock, env.lock_path)
    (wheels / "requirements.lock").write_text(lock)
    (wheels / "install.lock").write_text("".join(
        f"{name}=={version} --hash=sha256:{sha}\n" for name, version, sha in pins
        if name != environment.INSTALLER))
    _check(environment.pip_download(
        env.definition.python, wheels, "--no-deps", "--require-hashes",
        "--requirement", str(wheels / "requirements.lock")), f"pip download for {env.name}")
    installed = {name for name, _, _ in pins}
    (directory / "build.json").write_text(json.dumps({
        "sandbox_python": env.definition.python,
        "sandbox_environment": env.name,
        "sandbox_check_imports": sorted({"stockade.sandbox.zygote", *env.definition.preload,
                                         *env.definition.session_preload}),
        "sandbox_font_cache": "matplotlib" in installed,
    }, indent=2) + "\n")
    for path in package_files():
        dest = directory / "stockade" / path.relative_to(package_root())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return directory


def import_rootfs(config: RunnerConfig, env: Environment, tarball: Path,
                  force: bool = False) -> bool:
    """Install the rootfs Packer exported (`./rootfs/...`, privileged owners) as the
    environment's image unless the current one is here; True if installed. Refused unless
    its sandbox sources are this code's, byte for byte, and its packages are its lock's."""
    if is_current(config, env) and not force:
        return False
    with _unpacked(config, tarball, image_name(config, env)) as staging:
        rootfs = staging / "rootfs"
        python = _check_rootfs(rootfs, env)
        _shift_ownership(rootfs, config.idmap_base)
        _install(config, env, rootfs)
        stamp = Stamp(digest=digest(env), built_at=time.time(), python=python,
                      packages=[f"{p.name}=={p.version}" for p in env.pins()],
                      environment=env.name)
        (image_dir(config, env) / STAMP).write_bytes(msgspec.json.encode(stamp))
    prune(config)
    return True


@contextlib.contextmanager
def _unpacked(config: RunnerConfig, tarball: Path, name: str,
              *members: str) -> Iterator[Path]:
    """`tarball` extracted with its owners and modes into a staging directory beside the
    images (so installing is a rename), removed again on the way out."""
    lxc_path = Path(config.lxc_path)
    lxc_path.mkdir(mode=0o711, parents=True, exist_ok=True)
    staging = lxc_path / f".staging-{name}"
    remove_tree(staging)
    staging.mkdir(mode=0o700)
    try:
        _run(["tar", "-C", str(staging), "--extract", "--file", str(tarball), "--gzip",
              "--numeric-owner", "--same-owner", "--same-permissions", "--xattrs", "--acls",
              *members], f"extracting {tarball}")
        yield staging
    finally:
        remove_tree(staging)


def _check_rootfs(rootfs: Path, env: Environment) -> str:
    """The rootfs's full python version, once its sandbox sources are known to be this
    code's and its installed distributions exactly the lock's."""
    try:
        python = os.readlink(rootfs / "usr/bin/python3").removeprefix("python")
    except OSError:
        raise ImageError(f"{rootfs.parent} holds no Debian rootfs with python3") from None
    how = f"build it from this checkout (`make environment ENV={env.name}`)"
    if python != env.definition.python:
        raise ImageError(f"the rootfs runs python {python}, but environment {env.name} is "
                         f"python {env.definition.python}: {how}")
    if not (rootfs / "usr/bin/catatonit").is_file():
        raise ImageError(f"{rootfs.parent} has no /usr/bin/catatonit, every run's init: {how}")
    site = rootfs / SITE.format(version=python)
    for path in package_files():
        copy = site / "stockade" / path.relative_to(package_root())
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            raise ImageError(f"the rootfs's {copy.relative_to(rootfs)} is not this stockade's "
                             f"{path.name}: {how}")
    installed = installed_distributions(site)
    locked = {(p.name, p.version) for p in env.pins()}
    if installed != locked:
        extra = sorted(f"{n}=={v}" for n, v in installed - locked)
        lacking = sorted(f"{n}=={v}" for n, v in locked - installed)
        raise ImageError(f"the rootfs's packages are not environment {env.name}'s lock "
                         f"(not locked: {', '.join(extra) or 'none'}; missing: "
                         f"{', '.join(lacking) or 'none'}): {how}")
    return _debian_python_version(rootfs, python) or python


def installed_distributions(site: Path) -> set[tuple[str, str]]:
    """(name, version) of each distribution installed in `site`, by its dist-info's name."""
    found = set()
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        found.add((environment.canonical_name(name), version))
    return found


def _debian_python_version(rootfs: Path, python: str) -> str | None:
    """The interpreter's upstream version from dpkg's status ("3.13.5-2" is 3.13.5): read,
    never run, as nothing of a rootfs is run on the host."""
    try:
        status = (rootfs / DPKG_STATUS).read_text(errors="replace")
    except OSError:
        return None
    for block in status.split("\n\n"):
        if re.search(rf"^Package: python{re.escape(python)}$", block, re.MULTILINE):
            match = re.search(r"^Version: (?:\d+:)?([0-9][0-9.]*)", block, re.MULTILINE)
            return match[1].rstrip(".") if match else None
    return None


def archive_path(config: RunnerConfig, env: Environment, directory: Path) -> Path:
    return directory / f"{image_name(config, env)}.tar.gz"


def export(config: RunnerConfig, env: Environment, directory: Path) -> Path:
    """Write the environment's current image (rootfs and stamp, owners numeric) as an
    archive; the host config is left out: `import_archive` writes it for the importing
    host's paths."""
    if not is_current(config, env):
        raise ImageError(missing_message(config, env))
    target = archive_path(config, env, directory)
    if target.is_file():  # named by the digest: the same image, complete (renamed last)
        return target
    partial = target.with_name(f".{target.name}.partial")
    try:
        _run(["tar", "-C", str(image_dir(config, env)), "--create", "--file", str(partial),
              "--use-compress-program", "gzip -1", "--numeric-owner", "--xattrs", "--acls",
              "--sort=name", STAMP, "rootfs"], "tar of the image")
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def import_archive(config: RunnerConfig, archive: Path) -> tuple[Environment, bool]:
    """Install an exported image unless its environment's current one is here; its
    environment and True if installed. An archive this stockade would not build (other
    sandbox code, another lock) is refused: its runner would not match it."""
    match = re.fullmatch(_image_name_pattern(config, "(.+)") + r"\.tar\.gz", archive.name)
    try:
        env = environment.get(match[1] if match else "")
    except environment.DefinitionError:
        raise ImageError(f"{archive.name} is not named as `stockade images export` names an "
                         f"image ({config.image}-ENVIRONMENT-DIGEST.tar.gz) of an environment "
                         f"this stockade defines ({', '.join(environment.names())})") from None
    if is_current(config, env):
        return env, False
    with _unpacked(config, archive, image_name(config, env), STAMP, "rootfs") as staging:
        try:
            stamp = msgspec.json.decode((staging / STAMP).read_bytes(), type=Stamp)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ImageError(f"{archive} has no valid {STAMP}: {exc}") from None
        if stamp.digest != digest(env):
            raise ImageError(
                f"{archive} holds image {stamp.digest[:12]} of environment {env.name}, but "
                f"this stockade needs {digest(env)[:12]} (its lock and sandbox code): export "
                "the image with the same stockade version, or build it here (`make "
                f"environment ENV={env.name}`)")
        _install(config, env, staging / "rootfs")
        (image_dir(config, env) / STAMP).write_bytes(msgspec.json.encode(stamp))
    prune(config)
    return env, True


def in_use(config: RunnerConfig) -> set[str]:
    """Images some container (of any runner on this host) is cloned from."""
    used = set()
    for depends in Path(config.lxc_path).glob("*/lxc_rdepends"):  # "<lxc path>\n<source>\n"
        lines = depends.read_text(errors="replace").splitlines()
        if len(lines) >= 2:
            used.add(lines[1])
    return used


def current_names(config: RunnerConfig) -> set[str]:
    """The images this stockade's environments need (every one it defines)."""
    return {image_name(config, env) for env in environment.available().values()}


def prune(config: RunnerConfig) -> list[str]:
    """Remove the images no environment of this stockade needs and no container (of any
    runner on this host) is cloned from: older locks and older sandbox code."""
    keep = current_names(config) | in_use(config)
    removed = []
    for old in sorted(Path(config.lxc_path).glob(f"{config.image}-*")):
        if old.name not in keep and (old / STAMP).exists():
            remove_tree(old)
            removed.append(old.name)
    return removed


def _run(argv: list[str], what: str) -> None:
    _check(subprocess.run(argv, capture_output=True, text=True, check=False), what)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
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


def _install(config: RunnerConfig, env: Environment, rootfs: Path) -> None:
    """Put the new rootfs in place under its own name; clones of other images go on."""
    final = image_dir(config, env)
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
