"""The HTTP API end to end: real runner, real LXC containers, directly and through nginx."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stockade.runner.local import Client, NginxProcess, RunnerProcess, request

STATUSES = [
    ("ok", "print('hi')", {}, {"stdout": "hi\n", "exit_code": 0}),
    ("runtime_error", "raise SystemExit(3)", {}, {"exit_code": 3}),
    ("signaled", "import os, signal\nos.kill(os.getpid(), signal.SIGABRT)", {},
     {"signal": "SIGABRT"}),
    ("time_limit", "while True: pass", {"cpu_time_s": 0.3}, {}),
    ("wall_time_limit", "import time\ntime.sleep(60)", {"wall_time_s": 0.5}, {}),
    ("memory_limit", "b = bytearray(400 << 20)", {"memory_mib": 64}, {}),
    ("output_limit", "while True: print('x' * 1000)", {"output_kib": 4},
     {"stdout_truncated": True}),
    ("file_size_limit", "open('big', 'wb').write(b'x' * 200_000)", {"file_size_kib": 64}, {}),
]


@pytest.mark.parametrize(("status", "code", "limits", "fields"), STATUSES,
                         ids=[s[0] for s in STATUSES])
def test_every_status_over_http(api: Client, status: str, code: str, limits: dict[str, Any],
                                fields: dict[str, Any]) -> None:
    result = api.run(code, **limits)
    assert result.status == status, (result.status, result.message, result.stderr[-1000:])
    for name, value in fields.items():
        assert getattr(result, name) == value, (name, getattr(result, name))
    if status != "ok":
        assert result.message, "a non-ok record says why"


def test_stdin_args_and_files_reach_the_program(api: Client) -> None:
    code = ("import sys, pathlib\n"
            "print(sys.argv[1:], sys.stdin.read(), pathlib.Path('data/in.txt').read_text(),"
            " pathlib.Path('blob.bin').read_bytes())")
    files = [{"name": "data/in.txt", "content": "text file"},
             {"name": "blob.bin", "content": base64.b64encode(b"\x00\xff").decode(),
              "encoding": "base64"}]
    result = api.run(code, stdin="from stdin", args=["-v", "x y"], files=files)
    assert result.status == "ok", result.stderr
    assert result.stdout == "['-v', 'x y'] from stdin text file b'\\x00\\xff'\n"


def test_a_run_is_confined_inside_its_container(runner: RunnerProcess) -> None:
    code = ("import os\n"
            "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(os.getuid(), status['Seccomp'].strip(), status['NoNewPrivs'].strip(),"
            " status['CapEff'].strip(), os.uname().nodename,"
            " open('/proc/self/oom_score_adj').read().strip(),"
            " sorted(os.listdir('/sys/class/net') if os.path.isdir('/sys/class/net') else []))")
    result = runner.run(code)
    assert result.status == "ok", result.stderr
    uid, seccomp, nnp, cap_eff, host, oom, _ = result.stdout.split(" ", 6)
    assert (uid, seccomp, nnp, cap_eff, host, oom) == ("61000", "2", "1", "0000000000000000",
                                                       "sandbox", "1000")


def test_preloaded_pandas_runs(runner: RunnerProcess) -> None:
    result = runner.run("import pandas as pd\nprint(pd.DataFrame({'a': [1, 2]}).a.sum())")
    assert (result.status, result.stdout) == ("ok", "3\n"), result.stderr


def test_piston_execute_answers_in_pistons_shape(api: Client) -> None:
    answer = api.post("/api/v2/execute", {
        "language": "python", "version": "*", "stdin": "in",
        "files": [{"content": "import sys\nprint(input(), sys.argv[1:])\nsys.exit(2)"},
                  {"content": "aux"}],
        "args": ["a"], "run_timeout": -1, "compile_timeout": -1, "run_memory_limit": -1,
        "unknown_piston_field": True})
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["language"] == "python"
    run = body["run"]
    assert (run["stdout"], run["code"], run["signal"], run["status"]) == (
        "in ['a']\n", 2, None, "RE")
    assert run["output"] == run["stdout"] + run["stderr"]


def test_piston_timeout_is_milliseconds(runner: RunnerProcess) -> None:
    answer = runner.post("/api/v2/execute", {
        "language": "py", "files": [{"name": "x.py", "content": "import time\ntime.sleep(9)"}],
        "run_timeout": 300})
    run = answer.json()["run"]
    assert run["status"] == "TO" and 250 <= run["wall_time"] < 3000, run


def test_piston_runtimes_and_languages(runner: RunnerProcess) -> None:
    runtimes = runner.get("/api/v2/runtimes").json()
    assert runtimes[0]["language"] == "python" and "py" in runtimes[0]["aliases"]
    languages = runner.get("/v1/languages").json()
    assert languages["languages"][0]["name"] == "python"
    assert "pandas" in languages["languages"][0]["preloaded"]
    assert languages["limits"]["maximum"]["memory_mib"] == runner.config.limits.maximum.memory_mib


def test_health_ready_and_metrics(runner: RunnerProcess) -> None:
    assert runner.get("/healthz").status == 200
    ready = runner.get("/readyz")
    assert ready.status == 200 and ready.json()["size"] == runner.config.all_containers
    runner.run("print(1)")
    metrics = runner.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    for name in ("stockade_run_seconds_bucket", "stockade_queue_wait_seconds_bucket",
                 "stockade_queue_depth", "stockade_pool_recycled_total"):
        assert name in metrics.body.decode(), name
    assert runner.metric("stockade_pool_size") == runner.config.all_containers
    assert runner.metric('stockade_runs_total{key="anonymous",kind="lean",status="ok"}') >= 1


def test_openapi_document_describes_the_routes(runner: RunnerProcess) -> None:
    document = runner.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/runs", "/api/v2/execute", "/readyz"} <= set(document["paths"])
    assert "RunRequest" in document["components"]["schemas"]


BAD = [
    ("malformed json", b"{", 400, "malformed_json", None),
    ("invalid utf-8", b'{"code": "\xff"}', 400, "invalid_utf8", None),
    ("not an object", b"[]", 422, "invalid_request", None),
    ("missing code", b"{}", 422, "invalid_request", None),
    ("unknown field", b'{"code": "", "colour": 1}', 422, "invalid_request", "colour"),
    ("wrong type", b'{"code": 5}', 422, "invalid_request", "code"),
    ("unknown limit", b'{"code": "", "limits": {"gpus": 1}}', 422, "invalid_request",
     "limits.gpus"),
    ("limit over cap", b'{"code": "", "limits": {"memory_mib": 99999}}', 422,
     "limit_out_of_range", "limits.memory_mib"),
    ("limit below floor", b'{"code": "", "limits": {"cpu_time_s": 0}}', 422,
     "limit_out_of_range", "limits.cpu_time_s"),
    ("negative limit", b'{"code": "", "limits": {"processes": -1}}', 422,
     "limit_out_of_range", "limits.processes"),
    ("unknown language", b'{"code": "", "language": "cobol"}', 422, "unknown_language",
     "language"),
    ("absolute file name", b'{"code": "", "files": [{"name": "/etc/x", "content": ""}]}', 422,
     "invalid_file_name", "files[0].name"),
    ("dot-dot file name", b'{"code": "", "files": [{"name": "a/../../x", "content": ""}]}',
     422, "invalid_file_name", "files[0].name"),
    ("long file name", b'{"code": "", "files": [{"name": "' + b"a" * 300 + b'", "content": ""}]}',
     422, "invalid_file_name", "files[0].name"),
    ("reserved file name", b'{"code": "", "files": [{"name": "main.py", "content": ""}]}', 422,
     "invalid_file_name", "files[0].name"),
    ("duplicate file", b'{"code": "", "files": [{"name": "a", "content": ""}, '
     b'{"name": "a", "content": ""}]}', 422, "invalid_file_name", "files[1].name"),
    ("a file where a directory must be", b'{"code": "", "files": [{"name": "a", "content": '
     b'""}, {"name": "a/b", "content": ""}]}', 422, "invalid_file_name", "files[1].name"),
    ("a directory where a file must be", b'{"code": "", "files": [{"name": "d/a/b", '
     b'"content": ""}, {"name": "d/a", "content": ""}]}', 422, "invalid_file_name",
     "files[1].name"),
    ("bad base64", b'{"code": "", "files": [{"name": "a", "content": "%%", '
     b'"encoding": "base64"}]}', 422, "invalid_file", "files[0].content"),
    ("bad encoding", b'{"code": "", "files": [{"name": "a", "content": "", '
     b'"encoding": "rot13"}]}', 422, "invalid_request", "files[0].encoding"),
    ("too many files", b'{"code": "", "files": [' + b", ".join(
        b'{"name": "f%d", "content": ""}' % i for i in range(65)) + b"]}", 422,
     "too_many_files", "files"),
    ("too many args", b'{"code": "", "args": [' + b", ".join([b'"a"'] * 300) + b"]}", 422,
     "invalid_args", "args"),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "field"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_the_error_shape(api: Client, case: str, body: bytes,
                                                   status: int, code: str,
                                                   field: str | None) -> None:
    answer = api.post("/v1/runs", body)
    assert answer.status == status, (case, answer.status, answer.body)
    error = answer.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["field"] == field, error


def test_body_over_the_cap_is_413_both_ways(runner: RunnerProcess, nginx: NginxProcess) -> None:
    cap = runner.config.max_body_kib * 1024
    body = b'{"code": "' + b"#" * cap + b'"}'
    direct = runner.post("/v1/runs", body)
    assert direct.status == 413 and direct.json()["error"]["code"] == "body_too_large"
    assert nginx.post("/v1/runs", body).status == 413


def test_unknown_route_and_method(runner: RunnerProcess) -> None:
    missing = runner.get("/v2/nothing")
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = runner.get("/v1/runs")
    assert wrong.status == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_piston_errors_use_pistons_shape(runner: RunnerProcess) -> None:
    answer = runner.post("/api/v2/execute", {"language": "python", "version": "2.7",
                                             "files": [{"content": ""}]})
    assert answer.status == 400 and "runtime is unknown" in answer.json()["message"]
    empty = runner.post("/api/v2/execute", {"language": "python", "files": []})
    assert empty.status == 400 and empty.json()["message"]


def test_every_answer_carries_a_request_id_and_errors_quote_it(api: Client) -> None:
    mine = request(api.port, "POST", "/v1/runs", b'{"code": "print(1)"}',
                   headers={"Content-Type": "application/json", "X-Request-Id": "client-42.a"})
    assert mine.status == 200 and mine.headers["x-request-id"] == "client-42.a"
    refused = request(api.port, "POST", "/v1/runs", b"{",
                      headers={"X-Request-Id": "not one\tof ours " + "x" * 200})
    made = refused.headers["x-request-id"]
    assert refused.status == 400 and re.fullmatch(r"[0-9a-f]{24,32}", made), made
    assert refused.json()["error"]["request_id"] == made
    piston_error = request(api.port, "POST", "/api/v2/execute", b"[]",
                           headers={"X-Request-Id": "p-1"})
    assert piston_error.json() == {"message": piston_error.json()["message"],
                                   "request_id": "p-1"}
    ids = {request(api.port, "GET", "/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_an_internal_error_says_only_its_request_id_and_the_log_has_the_detail(
        runner: RunnerProcess) -> None:
    """A zygote killed mid-run is stockade's failure: the client learns that and an id,
    not the internals; the runner's log has both."""
    runner.wait_for_full_pool(runner.config.all_containers)
    code = "import time\nopen('doomed-marker', 'w').close()\ntime.sleep(30)"
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(request, runner.port, "POST", "/v1/runs",
                             msgspec.json.encode({"code": code}),
                             headers={"X-Request-Id": "doomed-1"})
        os.kill(_zygote_of_the_run_that_wrote(runner, "doomed-marker"), signal.SIGKILL)
        result = answer.result(timeout=60)
    body = result.json()
    assert result.status == 200 and body["status"] == "internal_error", body
    assert body["message"] == ("stockade failed to run this (not the program's fault); "
                               "request id doomed-1")
    log = runner.log()
    assert "request doomed-1: internal error:" in log, log


def _zygote_of_the_run_that_wrote(runner: RunnerProcess, marker: str) -> int:
    """The zygote (its container's init) above the process whose workdir holds `marker`."""
    zygotes = {int(subprocess.run(["lxc-info", "-P", runner.config.lxc_path, "-n", name, "-p",
                                   "-H"], capture_output=True, text=True, check=True).stdout)
               for name in runner.containers()}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and (entry / "cwd" / marker).exists():
                    pid = int(entry.name)
                    while pid > 1 and pid not in zygotes:
                        status = Path(f"/proc/{pid}/status").read_text()
                        pid = int(status.split("PPid:")[1].split()[0])
                    if pid in zygotes:
                        return pid
        time.sleep(0.1)
    raise AssertionError(f"no run wrote {marker}")
