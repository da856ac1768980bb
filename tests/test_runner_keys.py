"""API keys end to end: 401 without one, 403 past what a key may ask for, 429 past its rate
or its share of the queue, each in the documented error shape; a revoked key stops working
at once; the key file keeps no secret; the log has one JSON line per run, naming the key."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stockade.runner.local import Answer, RunnerProcess, runner_config
from support.runners import own_runner

PORT = 18097
RUN = {"code": "print(1)"}


@pytest.fixture(scope="module")
def runner() -> Iterator[RunnerProcess]:
    config = runner_config(PORT, "stockade-a-", pool_size=1, lean_pool_size=1, anonymous=None)
    with own_runner(config) as process:
        yield process


def error(answer: Answer, status: int, code: str) -> dict[str, str]:
    assert answer.status == status, (answer.status, answer.body)
    detail = answer.json()["error"]
    assert detail["code"] == code, detail
    assert detail["request_id"] == answer.headers["x-request-id"]
    return detail


def test_without_a_key_runs_are_refused_with_401(runner: RunnerProcess) -> None:
    answer = runner.post("/v1/runs", RUN)
    assert "stockade keys add" in error(answer, 401, "key_required")["message"]
    assert answer.headers["www-authenticate"] == 'Bearer realm="stockade"'
    piston = runner.post("/api/v2/execute", {"language": "python", "version": "*",
                                             "files": [{"content": "print(1)"}]})
    assert piston.status == 401 and "API key" in piston.json()["message"]
    assert runner.get("/metrics").status == 401


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer nope",
                                    "Bearer stk_000000000000_" + "A" * 43])
def test_a_wrong_key_is_refused_with_401(runner: RunnerProcess, header: str) -> None:
    answer = runner.post("/v1/runs", RUN, headers={"Authorization": header})
    error(answer, 401, "invalid_key")


def test_what_needs_no_key(runner: RunnerProcess) -> None:
    for path in ("/healthz", "/readyz", "/v1/languages", "/openapi.json", "/api/v2/runtimes"):
        assert runner.get(path).status == 200, path


def test_a_key_runs_code_and_its_own_caps_give_403(runner: RunnerProcess) -> None:
    key = runner.add_key("capped", "--max-memory", "64")
    client = runner.with_key(key)
    assert client.run("print(6 * 7)").stdout == "42\n"
    # The scheme's name is case-insensitive.
    assert runner.post("/v1/runs", RUN, headers={"Authorization": f"bearer {key}"}).status == 200
    detail = error(client.post("/v1/runs", {**RUN, "limits": {"memory_mib": 100}}), 403,
                   "limit_not_allowed")
    assert detail["field"] == "limits.memory_mib" and "64" in detail["message"]
    # A default above the key's cap is lowered to it: 100 MiB is more than this run has.
    hog = client.run("x = bytearray(100 << 20)")
    assert hog.status == "memory_limit", hog
    error(client.get("/metrics"), 403, "scope_not_allowed")


def test_the_metrics_scope_opens_metrics(runner: RunnerProcess) -> None:
    runs = runner.with_key(runner.add_key("counted"))
    runs.run("print(1)")
    scraper = runner.with_key(runner.add_key("scraper", "--scope", "metrics"))
    assert scraper.metric('stockade_runs_total{key="counted",kind="lean",status="ok"}') == 1
    error(scraper.post("/v1/runs", RUN), 403, "scope_not_allowed")


def test_over_its_rate_a_key_gets_429_with_retry_after(runner: RunnerProcess) -> None:
    client = runner.with_key(runner.add_key("slow", "--runs-per-minute", "6"))
    assert client.post("/v1/runs", RUN).status == 200  # the burst: 6/6 = one run
    answer = client.post("/v1/runs", RUN)
    assert "6 runs per minute" in error(answer, 429, "rate_limited")["message"]
    assert 9 <= int(answer.headers["retry-after"]) <= 10  # one run per 10 s


def test_past_its_share_of_the_queue_a_key_gets_429(runner: RunnerProcess) -> None:
    client = runner.with_key(runner.add_key("narrow", "--concurrency", "1", "--queue", "1"))
    slow = {"code": "import time\ntime.sleep(1.5)"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(client.post, "/v1/runs", slow)
        time.sleep(0.4)
        waiting = pool.submit(client.post, "/v1/runs", slow)
        time.sleep(0.3)
        refused = client.post("/v1/runs", slow)
        error(refused, 429, "too_many_waiting")
        assert refused.headers["retry-after"] == "1"
        assert running.result().status == 200 and waiting.result().status == 200


def test_a_revoked_key_stops_working_within_a_second(runner: RunnerProcess) -> None:
    client = runner.with_key(runner.add_key("leaving"))
    assert client.post("/v1/runs", RUN).status == 200
    runner.revoke_key("leaving")
    time.sleep(1.1)
    error(client.post("/v1/runs", RUN), 401, "invalid_key")


def test_the_key_file_keeps_hashes_only(runner: RunnerProcess) -> None:
    key = runner.add_key("stored")
    path = Path(runner.config.keys_file)
    text = path.read_text()
    assert key.split("_", 2)[2] not in text and "scrypt$16384$8$1$" in text
    mode = path.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o640 and mode.st_uid == 0
    listed = subprocess.run([sys.executable, "-m", "stockade", "keys", "list", "--config",
                             str(runner.config_path)], capture_output=True, text=True,
                            check=True).stdout
    assert "stored\t" in listed and key not in listed


def test_keys_add_refuses_a_taken_name_and_a_bad_one(runner: RunnerProcess) -> None:
    runner.add_key("taken")
    for name, words in (("taken", "exists"), ("Bad Name", "a key's name")):
        made = subprocess.run([sys.executable, "-m", "stockade", "keys", "add", name,
                               "--config", str(runner.config_path)],
                              capture_output=True, text=True, check=False)
        assert made.returncode == 2 and words in made.stderr, made.stderr


def test_the_openapi_document_names_the_bearer_scheme(runner: RunnerProcess) -> None:
    document = runner.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    post = document["paths"]["/v1/runs"]["post"]
    assert post["security"] == [{"apiKey": []}]  # no anonymous callers on this runner
    assert {"401", "403", "429", "503"} <= set(post["responses"])


def test_each_run_is_one_json_log_line_naming_its_key(runner: RunnerProcess) -> None:
    client = runner.with_key(runner.add_key("logged"))
    answer = client.post("/v1/runs", RUN, headers={"X-Request-Id": "trace-me-1"})
    assert answer.status == 200
    time.sleep(0.2)
    lines = [json.loads(line) for line in runner.log_path.read_text().splitlines()
             if line.startswith("{")]
    run = next(line for line in lines if line.get("request_id") == "trace-me-1")
    assert run["event"] == "run" and run["key"] == "logged" and run["status"] == "ok"
    assert run["route"] == "/v1/runs" and run["kind"] == "lean"
    assert run["container"].startswith("stockade-a-lean-")
    for field in ("cpu_time_s", "wall_time_s", "memory_peak_kib", "queue_wait_s", "time"):
        assert field in run, field
    events = {line["event"] for line in lines}
    assert {"config_loaded", "container_created", "pool_warm", "serving"} <= events


def test_stockade_run_takes_its_key_from_the_environment(runner: RunnerProcess,
                                                         tmp_path: Path) -> None:
    program = tmp_path / "hello.py"
    program.write_text("print('keyed')")
    argv = [sys.executable, "-m", "stockade", "run", "--url",
            f"http://127.0.0.1:{runner.port}", str(program)]
    env = {"PATH": "/usr/bin:/bin"}
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 2 and "refused: key_required" in refused.stderr
    env["STOCKADE_API_KEY"] = runner.add_key("cli")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and done.stdout == "keyed\n", done.stderr
