"""Environments: which Python a run gets and what it may import, as data.

Each directory under `environments/` beside this module that holds an `environment.toml`
is one environment, named by its directory: the Debian release whose python3 it runs, the
package set it carries (`environments/sets/<set>.in`), what its zygotes preload, and its
`requirements.lock`: every wheel of the set and of the sandbox's own requirements, pinned
with its sha256 (`make lock ENV=NAME` writes it; the image build installs it with
`--require-hashes` and no index). An environment's sandbox image is made of exactly these
and this checkout's sandbox code, and named by their digest (runner/manager/images.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

DEFAULT = "python-3.11"
ROOT = Path(__file__).parent / "environments"
LOCK = "requirements.lock"
DEFINITION = "environment.toml"
# The installer: pip runs from its own (locked) wheel in the build, and is not installed.
INSTALLER, INSTALLER_VERSION = "pip", "25.3"
NAME = re.compile(r"^[a-z][a-z0-9]*(?:[.-][a-z0-9]+)*$")
_LOCK_LINE = re.compile(
    r"^([a-z0-9][a-z0-9._-]*)==([A-Za-z0-9.+!_-]+) --hash=sha256:([0-9a-f]{64})$")
_WHEEL = re.compile(r"^([A-Za-z0-9_.]+)-([A-Za-z0-9_.+!]+)(?:-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")

Token = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.-]*$", max_length=64)]
Module = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", max_length=128)]


class DefinitionError(ValueError):
    """An environment's definition or lock is missing or malformed; the message says where."""


class Definition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An environment.toml."""

    description: Annotated[str, msgspec.Meta(max_length=200)]
    suite: Token  # the Debian release LXC's debian template bootstraps
    python: Annotated[str, msgspec.Meta(pattern=r"^3\.[0-9]+$")]  # that release's python3
    packages: Token  # the package set, environments/sets/<packages>.in
    preload: list[Module] = []  # what the full zygote imports (the lean one: none)
    session_preload: list[Module] = []  # a session's zygote
    language: Token = "python"


class Pin(msgspec.Struct, frozen=True):
    name: str
    version: str


@dataclass(frozen=True, eq=False)  # one object per definition (`available` is cached)
class Environment:
    name: str
    definition: Definition
    directory: Path

    @property
    def lock_path(self) -> Path:
        return self.directory / LOCK

    @property
    def set_path(self) -> Path:
        return self.directory.parent / "sets" / f"{self.definition.packages}.in"

    def lock_text(self) -> str:
        try:
            return self.lock_path.read_text()
        except FileNotFoundError:
            raise DefinitionError(f"environment {self.name} has no {LOCK}: write it with "
                                  f"`make lock ENV={self.name}`") from None

    def pins(self) -> list[Pin]:
        """What the lock installs (the installer left out), in the lock's order."""
        return [Pin(name, version) for name, version, _ in parse_lock(self.lock_text(),
                                                                      self.lock_path)
                if name != INSTALLER]

    def requested(self) -> list[str]:
        """The set's own requirements and the sandbox's, as the lock was made from."""
        try:
            lines = self.set_path.read_text().splitlines()
        except FileNotFoundError:
            raise DefinitionError(f"environment {self.name} names the package set "
                                  f"{self.definition.packages!r}, but {self.set_path} is "
                                  "missing") from None
        wanted = [line.split("#")[0].strip() for line in lines]
        return sorted({*filter(None, wanted), *sandbox_requirements()})


def parse_lock(text: str, where: Path | str = LOCK) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of each line: `name==version --hash=sha256:HEX`."""
    pins = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LOCK_LINE.match(line)
        if not match:
            raise DefinitionError(f"{where}:{number}: not `name==version "
                                  f"--hash=sha256:HEX`: {line[:80]!r}")
        pins.append((match[1], match[2], match[3]))
    if not pins:
        raise DefinitionError(f"{where} pins nothing")
    return pins


def sandbox_requirements() -> list[str]:
    """What the sandbox code itself imports in a container (msgspec), as stockade pins it."""
    return sorted(r for r in importlib.metadata.requires("stockade") or [] if ";" not in r)


@functools.cache
def available(root: Path = ROOT) -> dict[str, Environment]:
    """Every environment defined under `root`, by name."""
    found = {}
    for path in sorted(root.glob(f"*/{DEFINITION}")):
        name = path.parent.name
        if not NAME.match(name) or len(name) > 32:
            raise DefinitionError(f"{path.parent}: an environment's name is lower-case "
                                  "letters, digits, dots and dashes (32 at most)")
        try:
            definition = msgspec.toml.decode(path.read_bytes(), type=Definition)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DefinitionError(f"{path}: {exc}") from None
        found[name] = Environment(name, definition, path.parent)
    return found


def names() -> list[str]:
    return sorted(available())


def get(name: str) -> Environment:
    try:
        return available()[name]
    except KeyError:
        raise DefinitionError(f"no environment {name!r}; defined: "
                              f"{', '.join(names())}") from None


def canonical_name(name: str) -> str:
    """A distribution's name as the lock writes it (PEP 503: `scikit_learn` is
    `scikit-learn`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_pin(path: Path) -> tuple[str, str]:
    match = _WHEEL.match(path.name)
    if not match:
        raise DefinitionError(f"not a wheel's name: {path.name}")
    return canonical_name(match[1]), match[2]


def pip_download(python: str, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pip download` of wheels only, for CPython `python` on manylinux on this machine's
    architecture: what an environment's image installs, for its lock and its build."""
    machine = os.uname().machine
    return subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-input",
         "--disable-pip-version-check", "--only-binary=:all:", "--implementation", "cp",
         "--python-version", python, "--platform", f"manylinux2014_{machine}",
         "--platform", f"manylinux_2_28_{machine}", "--dest", str(dest), *args],
        capture_output=True, text=True, check=False)


def lock(env: Environment) -> str:
    """Resolve the set and the sandbox's requirements for the environment's Python (wheels
    only, manylinux on this machine's architecture), and the installer; return the lock:
    each wheel pinned by version and sha256."""
    installer = f"{INSTALLER}=={INSTALLER_VERSION}"
    with tempfile.TemporaryDirectory(prefix="stockade-lock-") as dest:
        proc = pip_download(env.definition.python, Path(dest), installer, *env.requested())
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise DefinitionError(f"pip download for {env.name} failed: {tail}")
        lines = []
        for wheel in sorted(Path(dest).glob("*.whl")):
            name, version = _wheel_pin(wheel)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines.append(f"{name}=={version} --hash=sha256:{digest}")
    header = [f"# {env.name}: the {env.definition.packages} set, the sandbox's own "
              "requirements and the installer,",
              f"# for CPython {env.definition.python} on manylinux {os.uname().machine}, "
              "each wheel pinned by its sha256.",
              f"# Written by `make lock ENV={env.name}`: do not edit."]
    return "\n".join([*header, *sorted(lines)]) + "\n"
