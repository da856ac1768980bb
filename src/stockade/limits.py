"""Per-run resource limits: what a request may ask for, bounded by what the operator allows.

Each limit is defined once, below, as an annotated type: its help text, unit, command-line
flag, floor (below it Python cannot start) and ceiling (the most an operator may allow).
The request schema, the policy's checks, the CLI's flags and the OpenAPI document all read
them from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec


def _limit(description: str, unit: str, flag: str, floor: float,
           ceiling: float) -> msgspec.Meta:
    return msgspec.Meta(description=description,
                        extra={"unit": unit, "flag": flag, "floor": floor, "ceiling": ceiling})


CpuTime = Annotated[float, _limit("CPU time limit in seconds", "s", "--cpu-time", 0.01, 300.0)]
WallTime = Annotated[float, _limit("wall-clock limit in seconds", "s", "--wall-time",
                                   0.01, 600.0)]
Memory = Annotated[int, _limit("memory limit in MiB", "MiB", "--memory", 16, 65536)]
Processes = Annotated[int, _limit("process and thread limit", "", "--processes", 1, 4096)]
Output = Annotated[int, _limit("stdout and stderr cap in KiB, each", "KiB", "--output",
                               1, 65536)]
FileSize = Annotated[int, _limit("largest file the program may write, KiB", "KiB",
                                 "--file-size", 0, 4 * 1024 * 1024)]


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The limits of one run, every one set."""

    cpu_time_s: CpuTime = 2.0
    wall_time_s: WallTime = 5.0
    memory_mib: Memory = 128
    processes: Processes = 16
    output_kib: Output = 64
    file_size_kib: FileSize = 1024

    @property
    def rlimit_cpu_s(self) -> int:
        """RLIMIT_CPU is whole seconds; finer limits are enforced from the cgroup's clock."""
        return max(1, math.ceil(self.cpu_time_s))


class LimitsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The limits a request asks for; each one left out (or null) takes the default."""

    cpu_time_s: CpuTime | None = None
    wall_time_s: WallTime | None = None
    memory_mib: Memory | None = None
    processes: Processes | None = None
    output_kib: Output | None = None
    file_size_kib: FileSize | None = None


@dataclass(frozen=True)
class LimitField:
    name: str
    kind: type[int] | type[float]
    description: str
    unit: str
    flag: str
    floor: int | float
    ceiling: int | float

    @property
    def metavar(self) -> str:
        return self.unit.upper() or "N"


def _fields() -> tuple[LimitField, ...]:
    """The limits as `Limits` declares them, read back from their annotations."""
    info = msgspec.inspect.type_info(Limits)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = []
    for field in info.fields:
        meta = field.type
        assert isinstance(meta, msgspec.inspect.Metadata) and meta.extra is not None
        kind: type[int] | type[float] = (
            int if isinstance(meta.type, msgspec.inspect.IntType) else float)
        extra = meta.extra
        fields.append(LimitField(field.name, kind, (meta.extra_json_schema or {})["description"],
                                 extra["unit"], extra["flag"], kind(extra["floor"]),
                                 kind(extra["ceiling"])))
    return tuple(fields)


FIELDS = _fields()
BY_NAME = {field.name: field for field in FIELDS}
# The smallest values a run can work with; a request below these is refused, not rounded.
FLOOR = msgspec.convert({f.name: f.floor for f in FIELDS}, Limits)
# What an operator may configure as a cap at most.
CEILING = msgspec.convert({f.name: f.ceiling for f in FIELDS}, Limits)


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
        for field in FIELDS:
            name, low, high = field.name, field.floor, field.ceiling
            if not low <= getattr(self.maximum, name) <= high:
                raise LimitError(f"maximum.{name}",
                                 f"maximum.{name} must be within [{low}, {high}]")
            if not low <= getattr(self.default, name) <= getattr(self.maximum, name):
                raise LimitError(f"default.{name}",
                                 f"default.{name} must be within [{low}, maximum.{name}]")

    def resolve(self, requested: LimitsIn | None) -> Limits:
        """Fill unset limits from the defaults; refuse mistyped or out-of-range ones."""
        values: dict[str, Any] = {}
        for field in FIELDS:
            value = getattr(requested, field.name, None)
            if value is not None:
                values[field.name] = self._checked(field, value)
        return msgspec.structs.replace(self.default, **values)

    def admit(self, limits: Limits) -> Limits:
        """A complete set of limits, as the zygote receives it: each within [floor, cap]."""
        for field in FIELDS:
            self._checked(field, getattr(limits, field.name))
        return limits

    def _checked(self, field: LimitField, value: Any) -> int | float:
        name, want_int = field.name, field.kind is int
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                want_int and not (isinstance(value, int) or float(value).is_integer())):
            kind = "an integer" if want_int else "a number"
            raise LimitError(name, f"{name} must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise LimitError(name, f"{name} must be finite")
        low, high = field.floor, getattr(self.maximum, name)
        if not low <= value <= high:
            unit = field.unit
            raise LimitError(name, f"{name}={value}{unit} is outside the allowed range "
                             f"[{low}, {high}]{unit}")
        return int(value) if want_int else float(value)
