"""Fair admission: callers take turns for containers, so one caller's flood delays another's
run by about one run; and the wait queue, sized from the pool, serves a burst a new user
makes with the default configuration."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from stockade.runner.config import RunnerConfig
from stockade.runner.front.pool_client import Lease, PoolClient
from stockade.runner.keys import Quota
from stockade.runner.local import RunnerProcess, runner_config
from support.runners import own_runner

PORT = 18096
SLOW = "import time\ntime.sleep(0.3)"


def test_a_freed_container_goes_to_the_next_caller_in_turn() -> None:
    async def scenario() -> list[str]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        pool = PoolClient(reader, writer, ["lean"])
        served: list[str] = []

        async def wait(caller: str) -> None:
            await pool.acquire("lean", caller)
            served.append(caller)

        flood = [asyncio.create_task(wait("a")) for _ in range(5)]
        await asyncio.sleep(0)
        other = asyncio.create_task(wait("b"))
        await asyncio.sleep(0)
        for n in range(3):
            pool.release(Lease(f"c{n}", "lean", "/nonexistent", 100000))  # one container frees
            await asyncio.sleep(0)
        for task in [*flood, other]:
            task.cancel()
        pool.task.cancel()
        writer.close()
        theirs.close()
        return served

    # b arrived behind five of a's runs, and is served second, not sixth.
    assert asyncio.run(scenario()) == ["a", "b", "a"]


@pytest.fixture(scope="module")
def keyed() -> Iterator[RunnerProcess]:
    """One lean container, so every slow run queues for it."""
    config = runner_config(PORT, "stockade-f-", pool_size=1, lean_pool_size=1, anonymous=None)
    with own_runner(config) as process:
        yield process


def test_one_keys_flood_delays_another_key_by_about_one_run(keyed: RunnerProcess) -> None:
    # As many runs at once as it sends: only taking turns keeps it from the front.
    flooder = keyed.with_key(keyed.add_key("flooder", "--runs-per-minute", "100000",
                                           "--concurrency", "20"))
    other = keyed.with_key(keyed.add_key("other", "--runs-per-minute", "100000"))
    with ThreadPoolExecutor(max_workers=20) as pool:
        flood = [pool.submit(flooder.post, "/v1/runs", {"code": SLOW}) for _ in range(20)]
        time.sleep(1.0)  # the flood holds the container and fills the queue behind it
        waits = []
        for _ in range(3):
            began = time.monotonic()
            assert other.run("print(1)").stdout == "1\n"
            waits.append(time.monotonic() - began)
        left_in_flood = sum(not f.done() for f in flood)
        assert all(f.result().status == 200 for f in flood)
    # Behind the flood in one line, each would wait for ~15 slow runs (4.5 s); in turn,
    # for the one that holds the container (0.3 s).
    assert left_in_flood >= 5, "the flood was over before the other key's runs"
    assert max(waits) < 1.5, waits


def test_a_burst_of_256_from_64_clients_is_served_with_the_defaults() -> None:
    config = RunnerConfig(port=PORT + 1, container_prefix="stockade-d-",
                          run_dir="/run/stockade-d",
                          anonymous=Quota(runs_per_minute=1_000_000))
    assert config.queue_limit == 0 and config.wait_queue >= 64
    with own_runner(config) as runner, ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda i: runner.post("/v1/runs", {"code": f"print({i})"}),
                                range(256)))
        assert [a.status for a in answers] == [200] * 256, {a.status for a in answers}
        assert [a.result().stdout for a in answers] == [f"{i}\n" for i in range(256)]
