"""Environments, measured (not a test): each environment's image size, its zygotes' memory,
and what a run costs in each of its zygotes over HTTP, against baselines taken in the same
run, interleaved, because this machine is shared and noisy:

- a hello-world (which goes to a lean zygote), direct and through nginx, against a bare
  `python3 -S -c pass` spawn (`baseline.Spawner`): target <= 0.45x, as bench_http.py holds the
  default environment to;
- the same hello sent to each full zygote (a preloaded module named in a comment): what
  forking the larger, preloaded interpreter costs, reported, not a target;
- a pandas run (import, a small frame) on the full zygote of each data environment against
  a fresh `python3 -c "import pandas"` of that environment's own interpreter, spawned in
  its image's rootfs (chroot): target <= 0.05x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import baseline
import load

from stockade import environment
from stockade.runner.config import EnvironmentPools
from stockade.runner.local import runner_config, serving
from stockade.runner.manager import image_list, images

HELLO = "print('hello')"
# The full zygote's kind is chosen by a preloaded module's name in the source.
HELLO_FULL = "print('hello')  # numpy"
PANDAS = "import pandas as pd\nprint(len(pd.DataFrame({'a': [1, 2]})))"


def body(code: str, env: str) -> bytes:
    return json.dumps({"code": code, "environment": env}).encode()


def fresh_import(rootfs: Path, module: str) -> float:
    started = time.perf_counter()
    subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", f"import {module}"],
                   check=True)
    return time.perf_counter() - started


def zygote_rss_mib(prefix: str) -> dict[str, float]:
    """Each kind's zygote resident size (the container's init), the median over its
    containers."""
    found: dict[str, list[float]] = {}
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            cmdline = (pid / "cmdline").read_bytes().split(b"\0")
            cgroup = (pid / "cgroup").read_text()
            status = (pid / "status").read_text()
        except OSError:
            continue
        if b"stockade.sandbox.zygote" not in cmdline or prefix not in cgroup:
            continue
        name = cgroup.split(prefix, 1)[1].split("/", 1)[0].rsplit("-", 1)[0]
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        found.setdefault(name, []).append(rss / 1024)
    return {kind: statistics.median(values) for kind, values in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--pandas-spawns", type=int, default=10)
    baseline.add_smoke(parser)
    args = parser.parse_args()
    rounds = baseline.rounds(args, args.rounds)
    # Two lean containers each, as a 2-core host's default pool has: the direct hello and
    # the nginx one that follows it must not wait for one container's next prepared run.
    others = {name: EnvironmentPools(pool_size=1, lean_pool_size=2)
              for name in environment.names() if name != environment.DEFAULT}
    config = runner_config(18182, "stockade-bench-env-", pool_size=1, lean_pool_size=2,
                           environments=others)
    results: dict[str, float] = {}
    with serving(config, 18183) as (runner, proxy), baseline.Spawner() as bare_spawn:
        results.update({f"zygote_rss_mib.{k}": v
                        for k, v in zygote_rss_mib(config.container_prefix).items()})
        conn, via_nginx = load.Connection(runner.port), load.Connection(proxy.port)
        for env in config.served:
            definition = environment.get(env)
            image = images.image_dir(config, definition)
            results[f"image_mib.{env}"] = image_list.tree_size(image / "rootfs") / 2**20
            # What a hello costs on each path; one where the environment has one zygote.
            calls = {"hello": (conn, HELLO), "hello_nginx": (via_nginx, HELLO)}
            if definition.definition.preload:
                calls["hello_full"] = (conn, HELLO_FULL)
            for _ in range(min(rounds, 20)):  # warm the connections, the pool and the page cache
                for client, code in calls.values():
                    client.post(body(code, env), stdout="hello\n")
                bare_spawn()
            samples: dict[str, list[float]] = {"bare": [], **{k: [] for k in calls}}
            for _ in range(rounds):  # interleaved, so drift hits all alike
                samples["bare"].append(bare_spawn())
                for name, (client, code) in calls.items():
                    samples[name].append(client.post(body(code, env), stdout="hello\n"))
            bare = statistics.median(samples["bare"])
            results[f"bare_ms.{env}"] = bare * 1000
            for name in calls:
                median = statistics.median(samples[name])
                results[f"{name}_ms.{env}"] = median * 1000
                results[f"{name}_ratio.{env}"] = median / bare
            if "pandas" in definition.definition.preload:
                fresh = [fresh_import(image / "rootfs", "pandas")
                         for _ in range(baseline.rounds(args, args.pandas_spawns, 2))]
                runs = [conn.post(body(PANDAS, env), stdout="2\n") for _ in range(rounds)]
                results[f"pandas_ms.{env}"] = statistics.median(runs) * 1000
                results[f"fresh_pandas_ms.{env}"] = statistics.median(fresh) * 1000
                results[f"pandas_ratio.{env}"] = statistics.median(runs) / statistics.median(
                    fresh)
    load.write_results("environments", results)
    for name, value in results.items():
        print(f"{name:40} {value:10.3f}")
    print(f"(bare spawn: {' '.join(baseline.BARE)}, from a process of its own)")
    load.print_targets(results, [
        (name, "<=", bound) for name in results
        for prefix, bound in (("hello_ratio.", 0.45), ("hello_nginx_ratio.", 0.45),
                              ("pandas_ratio.", 0.05)) if name.startswith(prefix)])
    load.rows_printed(len(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
