"""The runner's configuration: one typed file, every limit capped, every queue bounded."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from stockade import environment
from stockade.limits import LimitPolicy
from stockade.runner.keys import Quota

DEFAULT_CONFIG_PATH = "/etc/stockade/runner.json"
DEFAULT_KEYS_FILE = "/var/lib/stockade/keys.json"
FULL, LEAN, SESSION = "full", "lean", "session"


def _default_pool_size() -> int:
    return max(2, os.cpu_count() or 1)


# The front ends a session at its ttl; its zygote ends it this much later if the front has
# not (a backstop, so no session outlives its terms by more).
SESSION_TTL_BACKSTOP_S = 60.0


class SessionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sessions: interpreters that live across calls, one per container of their own pool.

    A session holds its container for its life, so `pool_size` is how many may live at
    once on this host (0 turns sessions off); one-shot runs never wait for them. Each
    bound below is a default a creation request may lower or raise up to its max."""

    pool_size: int = 2
    idle_timeout_s: float = 600.0
    max_idle_timeout_s: float = 3600.0
    ttl_s: float = 3600.0
    max_ttl_s: float = 86400.0
    # CPU time over the session's life (each call also has the limits' cpu_time_s).
    cpu_total_s: float = 60.0
    max_cpu_total_s: float = 300.0
    # What one call may show (values of its last expression, display(), figures).
    max_outputs: int = 16
    max_output_kib: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.pool_size <= 256:
            raise ValueError("sessions.pool_size must be within [0, 256]")
        for name, cap in (("idle_timeout_s", self.max_idle_timeout_s),
                          ("ttl_s", self.max_ttl_s), ("cpu_total_s", self.max_cpu_total_s)):
            value = getattr(self, name)
            if not 0 < value <= cap:
                raise ValueError(f"sessions.{name} must be within (0, max_{name}]")
        if self.max_ttl_s > 7 * 86400 or self.max_cpu_total_s > 3600:
            raise ValueError("sessions.max_ttl_s is capped at a week, max_cpu_total_s at "
                             "an hour")
        if self.max_outputs <= 0 or self.max_output_kib <= 0:
            raise ValueError("sessions.max_outputs and max_output_kib must be positive")


class EnvironmentPools(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The containers of one environment other than the default: full ones (its zygote
    preloads the environment's `preload`) and lean ones (the standard modules only)."""

    pool_size: int = 1
    lean_pool_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.pool_size <= 256 and 0 <= self.lean_pool_size <= 256):
            raise ValueError("an environment's pool sizes must be within [0, 256]")


def _default_environments() -> dict[str, EnvironmentPools]:
    return {"python-3.13": EnvironmentPools(pool_size=1, lean_pool_size=1),
            "python-3.13-base": EnvironmentPools(pool_size=1, lean_pool_size=0)}


class RunnerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # The unprivileged user the HTTP front runs as (created by `stockade serve` if missing).
    user: str = "stockade"
    # The environment a run gets unless it names one (stockade/environments/), and its
    # containers: full ones, whose zygote preloads what the environment names (numpy,
    # pandas), and lean ones with only the standard library: forking a smaller interpreter
    # is about twice as fast, so runs that never name a preloaded module go to a lean one
    # (0 turns the lean pool off).
    default_environment: str = environment.DEFAULT
    pool_size: int = msgspec.field(default_factory=_default_pool_size)
    lean_pool_size: int = msgspec.field(default_factory=_default_pool_size)
    # The other environments this host serves, each with its own pools (both 0, or left
    # out: not served). Each needs its image (`make sandbox-image`).
    environments: dict[str, EnvironmentPools] = msgspec.field(
        default_factory=_default_environments)
    # Runs that may wait for a container, each at most queue_timeout_s; past either the
    # answer is 503 + Retry-After. 0 sizes the queue from the pool (see `wait_queue`).
    queue_limit: int = 0
    queue_timeout_s: float = 10.0
    # Who may run code: a key from `keys_file` (`stockade keys add`), and nobody else
    # unless `anonymous` is set, which is then the quota all anonymous callers share.
    keys_file: str = DEFAULT_KEYS_FILE
    anonymous: Quota | None = None
    # A container serves run after run: its zygote proves each run gone (reaped, its
    # cgroup empty) or exits, so a failed program is no reason to replace it. These bound
    # what no check sees (a layout or state learned by one run and reused by a later one):
    # replaced after this many runs or seconds, whichever comes first (docs/runner.md).
    recycle_after_runs: int = 1000
    recycle_after_s: float = 900.0
    limits: LimitPolicy = LimitPolicy()
    max_body_kib: int = 4096
    max_files: int = 64
    max_file_kib: int = 1024
    # Files a run writes under out/ that come back in the result.
    max_out_files: int = 16
    max_out_kib: int = 1024
    # Where containers, their sockets and the runner's own state live (all created by root).
    lxc_path: str = "/var/lib/stockade/containers"
    run_dir: str = "/run/stockade"
    image: str = "stockade-sandbox"
    # At start, a missing sandbox image is imported from `image_archive_dir` (the archive
    # `stockade images export` wrote); without one the runner refuses to start.
    image_archive_dir: str = "/var/lib/stockade/images"
    container_prefix: str = "stockade-pool-"
    # Each container maps its ids to a range of its own on the host (`idmap_size` ids, so
    # that what the kernel counts per uid is never shared between containers), one of
    # `idmap_ranges` from `idmap_base`; all are written to /etc/subuid and /etc/subgid.
    # 0 sizes it from the pool: twice the containers, and two more, since a replacement
    # starts before the container it replaces is gone (see `uid_ranges`).
    idmap_base: int = 100000
    idmap_size: int = 65536
    idmap_ranges: int = 0
    # Each container's cgroup caps: room for the largest run plus the zygote and a prepared run.
    container_memory_overhead_mib: int = 512
    container_cpus: float = 1.0
    # Every container sits in one parent cgroup whose memory cap bounds them all together:
    # this many MiB, or with 0 the host's memory less `memory_reserve_mib`, which is what
    # the host keeps for itself (the runner, nginx, sshd, the page cache). A pool whose cap
    # does not fit is refused at start and by `stockade check-config`.
    pool_memory_mib: int = 0
    memory_reserve_mib: int = 1024
    drain_timeout_s: float = 30.0
    sessions: SessionPolicy = SessionPolicy()
    # MCP over HTTP (`stockade mcp --http`, a process of its own on 127.0.0.1:mcp_port; 0:
    # none): nginx routes /mcp to it. An MCP session idle this long ends, with the
    # sessions it opened; nginx waits longer than that for its stream.
    mcp_port: int = 0
    mcp_idle_timeout_s: float = 900.0
    # Host names (with a port, or `name:*`) and origins (`https://app.example.com`)
    # beyond loopback's that callers may use: /mcp refuses others (DNS rebinding).
    allowed_hosts: list[str] = []
    allowed_origins: list[str] = []

    def __post_init__(self) -> None:
        positive = ("port", "pool_size", "queue_timeout_s",
                    "recycle_after_runs", "recycle_after_s", "max_body_kib",
                    "max_files", "max_file_kib", "max_out_files", "max_out_kib",
                    "idmap_base", "idmap_size", "container_cpus", "drain_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not self.port < 65536:
            raise ValueError("port must be below 65536")
        self._check_mcp()
        if self.pool_size > 256 or self.lean_pool_size > 256 or self.queue_limit > 4096:
            raise ValueError("pool sizes are capped at 256 and queue_limit at 4096")
        if self.lean_pool_size < 0 or self.queue_limit < 0:
            raise ValueError("lean_pool_size and queue_limit must be 0 or more")
        if self.pool_memory_mib < 0 or self.memory_reserve_mib < 0:
            raise ValueError("pool_memory_mib and memory_reserve_mib must be 0 or more")
        if self.idmap_size < 65536:
            raise ValueError("idmap_size must be at least 65536 (runs use uid 61000)")
        if self.idmap_ranges and not self.all_containers < self.idmap_ranges <= 4096:
            raise ValueError(f"idmap_ranges must exceed the containers ({self.all_containers}"
                             ": each holds one, and a replacement needs a free one) and be "
                             "at most 4096; or 0 to size it from the pool")
        defined = environment.names()
        for name in [self.default_environment, *self.environments]:
            if name not in defined:
                raise ValueError(f"no environment {name!r}; defined: {', '.join(defined)}")
        if self.default_environment in self.environments:
            raise ValueError(f"environments names the default environment "
                             f"{self.default_environment}, whose pools are pool_size and "
                             "lean_pool_size")
        if self.idmap_base + self.idmap_span > 1 << 31:
            raise ValueError("idmap_base + uid_ranges * idmap_size must stay below 2^31")

    def _check_mcp(self) -> None:
        if not 0 <= self.mcp_port < 65536 or self.mcp_port == self.port:
            raise ValueError("mcp_port must be below 65536 and differ from port (0: none)")
        if not 0 < self.mcp_idle_timeout_s <= 86400:
            raise ValueError("mcp_idle_timeout_s must be within (0, 86400]")

    @property
    def containers(self) -> int:
        """Containers for one-shot runs (the sessions' pool is apart)."""
        return self.pool_size + self.lean_pool_size + sum(
            e.pool_size + e.lean_pool_size for e in self.environments.values())

    @property
    def served(self) -> list[str]:
        """The environments this host serves, the default first."""
        return [self.default_environment, *sorted(
            name for name, pools in self.environments.items()
            if pools.pool_size + pools.lean_pool_size)]

    def pools(self, name: str) -> EnvironmentPools:
        if name == self.default_environment:
            return EnvironmentPools(self.pool_size, self.lean_pool_size)
        return self.environments[name]

    @property
    def all_containers(self) -> int:
        return self.containers + self.sessions.pool_size

    @property
    def uid_ranges(self) -> int:
        """How many containers' uid ranges there are: `idmap_ranges`, or with 0 twice the
        containers and two (each replacement starts before the one it replaces goes)."""
        return self.idmap_ranges or 2 * self.all_containers + 2

    @property
    def idmap_span(self) -> int:
        """Every id the containers' ranges take together, from `idmap_base`."""
        return self.uid_ranges * self.idmap_size

    @property
    def wait_queue(self) -> int:
        """How many runs may wait: `queue_limit`, or with 0 what the pool can start within
        `queue_timeout_s` at ten runs per container-second (a hello-world holds a
        container ~10 ms, a typical test case ~100 ms). Longer runs meet the timeout's
        503 rather than a longer queue; 4096 at most."""
        if self.queue_limit:
            return self.queue_limit
        return min(4096, max(16, math.ceil(self.containers * self.queue_timeout_s * 10)))

    @property
    def pool_socket_dir(self) -> Path:
        return Path(self.run_dir) / "pool"

    @property
    def container_memory_mib(self) -> int:
        return self.limits.maximum.memory_mib + self.container_memory_overhead_mib

    @property
    def container_pids(self) -> int:
        return self.limits.maximum.processes + 64


def host_memory_mib(meminfo: str = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ValueError(f"no MemTotal in {meminfo}")


def pool_memory_cap_mib(config: RunnerConfig, host_mib: int) -> int:
    """The pool's memory cap on a host of `host_mib`; a ValueError says what to change."""
    room = host_mib - config.memory_reserve_mib
    one = config.container_memory_mib
    if config.pool_memory_mib > room:
        raise ValueError(f"pool_memory_mib is {config.pool_memory_mib} MiB, more than this "
                         f"host's {host_mib} MiB less the {config.memory_reserve_mib} MiB "
                         f"reserve ({room} MiB): lower it, or set 0 to take {room} MiB")
    cap = config.pool_memory_mib or room
    if cap < one:
        raise ValueError(f"the pool may use {cap} MiB (host {host_mib} MiB, reserve "
                         f"{config.memory_reserve_mib} MiB), less than one container's cap "
                         f"of {one} MiB (the largest run's limits.maximum.memory_mib plus "
                         f"container_memory_overhead_mib): lower those, or the reserve")
    return cap


@dataclass(frozen=True)
class Kind:
    """One pool of identical containers: an environment's full, lean or session zygotes."""

    name: str  # the kind alone for the default environment, else "<environment>-<kind>"
    size: int
    preload: list[str]
    environment: str


def kind_name(config: RunnerConfig, env: str, kind: str) -> str:
    return kind if env == config.default_environment else f"{env}-{kind}"


def kinds(config: RunnerConfig) -> list[Kind]:
    found = []
    for name in config.served:
        preload = list(environment.get(name).definition.preload)
        pools = config.pools(name)
        if preload:
            found.append(Kind(kind_name(config, name, FULL), pools.pool_size, preload, name))
            found.append(Kind(kind_name(config, name, LEAN), pools.lean_pool_size, [], name))
        else:  # nothing to preload: its full and lean zygotes are one and the same
            found.append(Kind(kind_name(config, name, FULL),
                              pools.pool_size + pools.lean_pool_size, [], name))
    if config.sessions.pool_size:  # notebook work: numpy, pandas and pyplot at hand
        definition = environment.get(config.default_environment).definition
        found.append(Kind(SESSION, config.sessions.pool_size, list(definition.session_preload),
                          config.default_environment))
    return [kind for kind in found if kind.size]


def kind_for(config: RunnerConfig, env: str, sources: list[str]) -> str:
    """The environment's lean pool, unless a source names a module only its full pool
    preloads (or it has no lean pool). A wrong guess costs time (the import happens in the
    run), never correctness."""
    preload = environment.get(env).definition.preload
    pools = config.pools(env)
    if not preload or not pools.lean_pool_size:
        return kind_name(config, env, FULL)
    if not pools.pool_size:
        return kind_name(config, env, LEAN)
    names = "|".join(re.escape(m.split(".")[0]) for m in preload)
    pattern = re.compile(rf"\b(?:{names})\b")
    full = any(pattern.search(source) for source in sources)
    return kind_name(config, env, FULL if full else LEAN)


def load(path: str | None) -> RunnerConfig:
    """Read the config file; a missing default file means the defaults."""
    if path is None:
        if not Path(DEFAULT_CONFIG_PATH).exists():
            return RunnerConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=RunnerConfig)
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"invalid config {path}: {exc}") from None
