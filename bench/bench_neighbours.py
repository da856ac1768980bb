"""A noisy neighbour (not a test): while one client posts `1/0` as fast as it may, how much
slower are another client's hello-worlds? Once with the flood on one connection (back to
back), once on four at once.

A program that fails is no evidence against its container, so the flood must not turn into
a stream of container replacements that starves everyone else. The quiet client's median
and p99 are measured alone, then under the flood, in the same run (this machine is shared
and noisy); the flood's own rate and the containers replaced during it are reported too.

Target (2-core machine): the quiet client's median under a one-connection flood <= 3x its
value alone. With one key for all (anonymous callers), four flooding connections take four
fifths of the line; with a key each, callers take turns for a freed container, so the
quiet key's median under the same four-connection flood must stay <= 3x its value alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import baseline  # bench/ is the script's directory
import load
from load import HELLO, Connection

from stockade.runner.local import RunnerProcess, runner_config, serving

FAILING = json.dumps({"code": "1/0"}).encode()


def quiet_client(port: int, rounds: int, key: str | None = None) -> list[float]:
    connection = Connection(port, key)
    return [connection.post(HELLO, "ok", "hello\n") for _ in range(rounds)]


def summary(prefix: str, samples: list[float]) -> dict[str, float]:
    return {f"{prefix}_median_ms": load.median_ms(samples),
            f"{prefix}_p99_ms": load.percentile(samples, 0.99) * 1000}


def under_flood(runner: RunnerProcess, connections: int, rounds: int,
                keys: tuple[str, str] | None = None) -> dict[str, float]:
    """The quiet client's figures while `connections` post `1/0` back to back (with
    `keys`: the flood's key and the quiet client's; without, both anonymous)."""
    stop = threading.Event()
    failed = [0] * connections
    flood_key, quiet_key = keys or (None, None)

    def flood(index: int) -> None:
        connection = Connection(runner.port, flood_key)
        while not stop.is_set():
            connection.post(FAILING, "runtime_error")
            failed[index] += 1

    recycled = runner.metric("stockade_pool_recycled_total")
    threads = [threading.Thread(target=flood, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)  # the flood is at full rate before the quiet client starts
        started = time.monotonic()
        samples = quiet_client(runner.port, rounds, quiet_key)
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    prefix = f"{'keys_' if keys else ''}flood{connections}"
    return {**summary(prefix, samples),
            f"{prefix}_runs_per_s": sum(failed) / (took + 1.0),
            f"{prefix}_recycled": runner.metric("stockade_pool_recycled_total") - recycled}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    baseline.add_smoke(parser)
    args = parser.parse_args()
    args.rounds = baseline.rounds(args, args.rounds)
    config = runner_config(18190, "stockade-bench-nb-", pool_size=2, queue_limit=64)
    with serving(config, 18191) as (runner, _proxy):
        runner.wait_for_full_pool(config.containers)
        quiet_client(runner.port, 20)  # warm the pool and the page cache
        alone = summary("alone", quiet_client(runner.port, args.rounds))
        loaded = {**under_flood(runner, 1, args.rounds), **under_flood(runner, 4, args.rounds)}
        keys = (runner.add_key("flood", "--runs-per-minute", "1000000", "--concurrency", "64"),
                runner.add_key("quiet", "--runs-per-minute", "1000000"))
        loaded |= under_flood(runner, 4, args.rounds, keys)
        after = summary("after", quiet_client(runner.port, args.rounds))
    # The quiet client is its own baseline (alone, before and after); a bare spawn's p50,
    # measured the one shared way, is reported beside it for scale.
    results = {**alone, **loaded, **after,
               "bare_p50_ms": baseline.rate(1, baseline.phase_s(args, 3.0)).p50_ms}
    unloaded = statistics.mean([results["alone_median_ms"], results["after_median_ms"]])
    for prefix in ("flood1", "flood4", "keys_flood4"):
        results[f"{prefix}_ratio"] = results[f"{prefix}_median_ms"] / unloaded
    load.write_results("neighbours", results)
    for name, value in results.items():
        print(f"{name:24} {value:10.3f}")
    load.print_targets(results, [("flood1_ratio", "<=", 3.0), ("keys_flood4_ratio", "<=", 3.0)])
    load.rows_printed(len(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
