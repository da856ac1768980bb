"""The environments the front serves, as the manager described their images: which one a
run asked for (by name, or Piston's language and version), and the listings."""

from __future__ import annotations

import re

from stockade.runner.front.schema import ApiError
from stockade.wire import LANGUAGE, EnvironmentInfo, Environments

_PISTON_VERSION = re.compile(r"^(?:[0-9]+|[x*])(?:\.(?:[0-9]+|[x*])){0,2}$", re.IGNORECASE)


class Catalogue:
    def __init__(self, infos: list[EnvironmentInfo]) -> None:
        if not infos or sum(info.default for info in infos) != 1:
            raise ValueError("the manager must name one default environment")
        self.infos = infos
        self.by_name = {info.name: info for info in infos}
        self.default = next(info for info in infos if info.default)

    def listing(self) -> Environments:
        return Environments(default=self.default.name, environments=self.infos)

    def choose(self, name: str | None) -> EnvironmentInfo:
        """The environment a run names (the default when it names none); else a 422 that
        lists the choices."""
        if name is None:
            return self.default
        found = self.by_name.get(name)
        if found is None:
            raise ApiError(422, "unknown_environment",
                           f"unknown environment {name[:64]!r}: this host serves "
                           f"{', '.join(self.by_name)} (GET /v1/environments lists them)",
                           "environment")
        return found

    def for_piston(self, language: str, version: str) -> EnvironmentInfo:
        """The first environment (the default first) whose interpreter matches Piston's
        `version`: `*`, a version (`3.13.5`), a prefix (`3.13`) or one with wildcards
        (`3.13.x`). Unknown is Piston's own 400, with the choices."""
        if _PISTON_VERSION.match(version):
            wanted = version.lower().split(".")
            for info in self.infos:
                have = info.version.split(".")
                if all(w in ("x", "*") or (i < len(have) and w == have[i])
                       for i, w in enumerate(wanted)):
                    return info
        versions = ", ".join(dict.fromkeys(info.version for info in self.infos))
        raise ApiError(400, "unknown_language", f"{language[:32]}-{version[:32]} runtime is "
                       f"unknown: this host has {LANGUAGE} {versions} (GET /api/v2/runtimes)",
                       "version")
