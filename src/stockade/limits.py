"""Per-run resource limits: what a request may ask for, bounded by what the operator allows.

Every limit has a floor (below it Python cannot start) and a configured cap.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cpu_time_s: float = 2.0
    wall_time_s: float = 5.0
    memory_mib: int = 128
    processes: int = 16
    output_kib: int = 64
    file_size_kib: int = 1024

    @property
    def rlimit_cpu_s(self) -> int:
        """RLIMIT_CPU is whole seconds; finer limits are enforced from the cgroup's clock."""
        return max(1, math.ceil(self.cpu_time_s))


# The smallest values a run can work with; a request below these is refused, not rounded.
FLOOR = Limits(cpu_time_s=0.01, wall_time_s=0.01, memory_mib=16, processes=1,
               output_kib=1, file_size_kib=0)
# What an operator may configure as a cap at most.
CEILING = Limits(cpu_time_s=300.0, wall_time_s=600.0, memory_mib=65536, processes=4096,
                 output_kib=65536, file_size_kib=4 * 1024 * 1024)

UNITS = {"cpu_time_s": "s", "wall_time_s": "s", "memory_mib": "MiB", "processes": "",
         "output_kib": "KiB", "file_size_kib": "KiB"}


class LimitError(ValueError):
    """A requested limit is outside what this service allows."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class LimitPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default: Limits = Limits()
    maximum: Limits = Limits(cpu_time_s=10.0, wall_time_s=20.0, memory_mib=1024,
                             processes=64, output_kib=1024, file_size_kib=65536)

    def __post_init__(self) -> None:
        for name in Limits.__struct_fields__:
            low, high = getattr(FLOOR, name), getattr(CEILING, name)
            if not low <= getattr(self.maximum, name) <= high:
                raise LimitError(f"maximum.{name}",
                                 f"maximum.{name} must be within [{low}, {high}]")
            if not low <= getattr(self.default, name) <= getattr(self.maximum, name):
                raise LimitError(f"default.{name}",
                                 f"default.{name} must be within [{low}, maximum.{name}]")

    def resolve(self, requested: dict[str, Any] | None) -> Limits:
        """Fill unset limits from the defaults; refuse unknown, mistyped or out-of-range ones."""
        values: dict[str, Any] = {}
        for name, value in (requested or {}).items():
            if name not in Limits.__struct_fields__:
                raise LimitError(name, f"unknown limit {name!r}; known: "
                                 + ", ".join(Limits.__struct_fields__))
            if value is None:
                continue
            values[name] = self._checked(name, value)
        return msgspec.structs.replace(self.default, **values)

    def _checked(self, name: str, value: Any) -> int | float:
        want_int = isinstance(getattr(FLOOR, name), int)
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                want_int and not (isinstance(value, int) or float(value).is_integer())):
            kind = "an integer" if want_int else "a number"
            raise LimitError(name, f"{name} must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise LimitError(name, f"{name} must be finite")
        low, high = getattr(FLOOR, name), getattr(self.maximum, name)
        if not low <= value <= high:
            unit = UNITS[name]
            raise LimitError(name, f"{name}={value}{unit} is outside the allowed range "
                             f"[{low}, {high}]{unit}")
        return int(value) if want_int else float(value)
