"""`make bench-smoke`: every bench, each measuring phase at most 2 s (`--smoke`). Passes
when every bench exits 0, prints every row (its last line counts them) and leaves nothing
behind: no process, container, cgroup, mount, run directory or temporary directory of its
own. Targets are printed by the benches, never asserted. Needs root, and the sandbox
images (`make sandbox-image`).

Every bench names what it makes `stockade-bench-*` (a runner's containers, cgroups, mounts
and run directory; bench_layers' cgroup parent and directories), or `bench-*` under the
zygotes' `stockade` cgroup; the benches themselves are `bench/bench_*.py`; a run's init
is catatonit, and one is the bench's when it is orphaned or below a process of the bench's.
That is what is looked for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHES = ["bench_layers", "bench_sandbox", "bench_http", "bench_neighbours", "bench_sessions",
           "bench_environments"]
TIMEOUT_S = 240
SETTLE_S = 10.0  # what a bench stopped is given to disappear (an LXC monitor exiting)
ROWS = re.compile(r"^bench: (\d+) rows, pid \d+$", re.MULTILINE)
MARK = "stockade-bench"


def stat_fields(proc: Path) -> list[str]:
    """/proc/PID/stat's fields after the command's name (which may hold spaces and ')'):
    [0] the state, [1] the parent, [19] the start tick."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()


def _process_table() -> dict[int, tuple[int, str, str, str]]:
    """Every process now: pid -> (parent, start tick, command line, cgroups)."""
    table = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            cgroup = (proc / "cgroup").read_text()
            stat = stat_fields(proc)
            table[int(proc.name)] = (int(stat[1]), stat[19], cmdline, cgroup)
        except (OSError, IndexError, ValueError):
            continue
    return table


def _processes() -> set[str]:
    """A bench's processes: named or placed as its own, and the run inits (catatonit) it
    left: orphaned, or below one of its own. Not every catatonit: a zygote of the tests or
    of a runner on this host keeps one ready for its next run, and may start it at any
    moment (a scan during its spawn sees the zygote's command line, the next the init's)."""
    table = _process_table()

    def marked(pid: int) -> bool:
        _, _, cmdline, cgroup = table.get(pid, (0, "", "", ""))
        return (MARK in cmdline or "/bench/bench_" in cmdline or MARK in cgroup
                or "/stockade/bench-" in cgroup)

    found = set()
    for pid, (parent, start, cmdline, _) in table.items():
        if pid == os.getpid():
            continue
        orphaned_init = cmdline.startswith("/usr/bin/catatonit") and (
            parent == 1 or marked(parent))
        if marked(pid) or orphaned_init:
            found.add(f"process {pid} (started at tick {start}): {cmdline[:120]}")
    return found


def _cgroups() -> set[str]:
    found = set()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for pattern in (f"{MARK}*", f"*/{MARK}*", f"*/*/{MARK}*", "stockade/bench-*",
                        f"lxc.*.{MARK}*", f"*/lxc.*.{MARK}*"):
            found.update(f"cgroup {p}" for p in hierarchy.glob(pattern) if p.is_dir())
    return found


def leftovers() -> set[str]:
    """Everything of a bench's that exists on this host now."""
    found = _processes() | _cgroups()
    found.update(f"mount {line.split()[4]}" for line in
                 Path("/proc/self/mountinfo").read_text().splitlines() if MARK in line)
    for pattern in (f"/run/{MARK}*", f"{tempfile.gettempdir()}/{MARK}*",
                    f"/var/lib/stockade/{MARK}*", f"/var/lib/stockade/*/{MARK}*"):
        found.update(f"path {p}" for p in Path("/").glob(pattern.lstrip("/")))
    return found


def left_since(before: set[str], settle_s: float = SETTLE_S) -> list[str]:
    """What is there now and was not `before`, once it has had `settle_s` to go."""
    deadline = time.monotonic() + settle_s
    while (left := leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return sorted(left)


def run_one(name: str) -> list[str]:
    """Run one bench; the problems with it (none: it passed)."""
    before = leftovers()
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"],
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(
            exc.stdout, bytes) else (exc.stdout or "")
        print(output)
        return [f"{name} did not end within {TIMEOUT_S} s"]
    took = time.monotonic() - started
    print(done.stdout, end="")
    problems = []
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        problems.append(f"{name} exited {done.returncode}")
    elif not ROWS.search(done.stdout):
        problems.append(f"{name} did not print all its rows (no closing 'bench: N rows')")
    problems += [f"{name} left {thing}" for thing in left_since(before)]
    print(f"== bench-smoke: {name}: {'ok' if not problems else 'FAILED'} in {took:.0f} s")
    return problems


def main() -> int:
    started = time.monotonic()
    problems = [problem for name in (sys.argv[1:] or BENCHES) for problem in run_one(name)]
    took = time.monotonic() - started
    for problem in problems:
        print(f"bench-smoke: {problem}", file=sys.stderr)
    print(f"== bench-smoke: {len(BENCHES) if not sys.argv[1:] else len(sys.argv[1:])} "
          f"benches in {took:.0f} s (the target is at most 180 s); "
          f"{'passed' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
