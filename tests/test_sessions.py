"""Sessions end to end: real runner, real LXC containers of the sessions' pool, over HTTP.

State persists between calls; sessions cannot see each other; a limit ends a session with
its status; reaping leaves nothing; a lost container's session answers 410; outputs stream
and rich values decode; the hostile battery holds inside a session."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from stockade.runner.local import Answer, Client, RunnerProcess, request
from support.battery import BATTERY, Context, Probe, stdout_json
from support.sse import stream

# The runs' uid, as the host sees it: 61000 in every container's range of 65536 from 100000.
RUN_UIDS_ON_HOST = ",".join(str(100000 + 61000 + 65536 * k) for k in range(64))


class Sessions:
    """A client of one caller's sessions; every session it started is deleted at the end."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.started: list[str] = []

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client.key}"} if self.client.key else {}

    def call(self, method: str, path: str, body: bytes | None = None) -> Answer:
        return request(self.client.port, method, path, body, headers=self._headers())

    def start(self, **terms: Any) -> dict[str, Any]:
        answer = self.client.post("/v1/sessions", terms)
        assert answer.status == 201, answer.body
        info: dict[str, Any] = answer.json()
        assert answer.headers["location"] == f"/v1/sessions/{info['id']}"
        self.started.append(info["id"])
        return info

    def run(self, session: str, code: str, stdin: str = "") -> dict[str, Any]:
        answer = self.client.post(f"/v1/sessions/{session}/runs", {"code": code,
                                                                   "stdin": stdin})
        assert answer.status == 200, answer.body
        record: dict[str, Any] = answer.json()
        return record

    def value(self, session: str, code: str) -> str:
        """The text/plain output of a cell whose last expression has a value."""
        record = self.run(session, code)
        assert record["status"] == "ok", record
        return next(o["data"] for o in record["outputs"] if o["mime"] == "text/plain")

    def delete(self, session: str) -> int:
        return self.call("DELETE", f"/v1/sessions/{session}").status

    def close(self) -> None:
        for session in self.started:
            self.delete(session)


@pytest.fixture
def sessions(runner: RunnerProcess) -> Iterator[Sessions]:
    client = Sessions(runner)
    try:
        yield client
    finally:
        client.close()


def wait_until_running(sessions: Sessions, session: str) -> None:
    deadline = time.monotonic() + 10
    while sessions.client.get(f"/v1/sessions/{session}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.02)


def error(answer: Answer) -> dict[str, Any]:
    detail: dict[str, Any] = answer.json()["error"]
    return detail


# -- state -----------------------------------------------------------------------------------

def test_names_imports_and_open_files_persist_between_calls(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    sessions.run(session, "import statistics\nx = 41\nlog = open('log.txt', 'w')\n"
                 "def bump(n):\n    return n + 1")
    sessions.run(session, "log.write('one,'); x = bump(x)")
    assert sessions.value(session, "log.write('two'); log.flush(); x") == "42"
    assert sessions.value(session, "open('log.txt').read()") == "'one,two'"
    assert sessions.value(session, "statistics.mean([1, 2, 3])") == "2"
    info = sessions.client.get(f"/v1/sessions/{session}").json()
    assert (info["state"], info["calls"]) == ("idle", 5)
    assert info["cpu_time_s"] > 0 and info["memory_peak_kib"] > 0


def test_each_call_has_its_own_stdin_and_a_traceback_of_its_own_lines(
        sessions: Sessions) -> None:
    session = sessions.start()["id"]
    record = sessions.run(session, "print(input()[::-1])", stdin="olleh\n")
    assert (record["status"], record["stdout"]) == ("ok", "hello\n")
    failed = sessions.run(session, "y = 1\nraise ValueError('cell failed')")
    assert (failed["status"], failed["exit_code"], failed["session_ended"]) == (
        "runtime_error", 1, False)
    assert 'File "<cell 2>", line 2' in failed["stderr"]
    assert "raise ValueError('cell failed')" in failed["stderr"]
    assert "session_driver" not in failed["stderr"]  # nothing of stockade's own frames
    assert sessions.value(session, "y") == "1"  # what ran before the error stays


# -- rich outputs ----------------------------------------------------------------------------

def test_a_table_comes_back_as_html_and_a_figure_as_a_valid_png(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    table = sessions.run(session, "import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    mimes = {o["mime"]: o for o in table["outputs"]}
    assert "<table" in mimes["text/html"]["data"] and "a" in mimes["text/plain"]["data"]
    figure = sessions.run(session, "import matplotlib.pyplot as plt\n"
                          "fig, ax = plt.subplots()\nax.plot([1, 3, 2])\nfig")
    png = next(o for o in figure["outputs"] if o["mime"] == "image/png")
    assert png["encoding"] == "base64"
    image = Image.open(io.BytesIO(base64.b64decode(png["data"])))
    image.verify()
    assert image.format == "PNG" and image.size[0] > 100
    drawn = sessions.run(session, "plt.plot([1, 2])\ndisplay('before')\nNone")
    assert [o["mime"] for o in drawn["outputs"]] == ["text/plain", "image/png"]
    assert drawn["outputs"][0]["data"] == "'before'"


def test_outputs_are_capped_in_count(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    record = sessions.run(session, "for i in range(40):\n    display(i)")
    assert len(record["outputs"]) == 16 and record["outputs_truncated"] is True
    assert [o["data"] for o in record["outputs"]] == [str(i) for i in range(16)]


# -- streaming -------------------------------------------------------------------------------

def test_a_cells_output_streams_while_it_runs(runner: RunnerProcess,
                                              sessions: Sessions) -> None:
    session = sessions.start()["id"]
    got = stream(runner, {"code": "import time\nprint('first', flush=True)\n"
                          "time.sleep(1.5)\nprint('second')\n'done'"},
                 path=f"/v1/sessions/{session}/runs")
    assert got.status == 200
    assert got.text("stdout") == got.result["stdout"] == "first\nsecond\n"
    assert got.result["outputs"] == [{"mime": "text/plain", "data": "'done'",
                                      "encoding": "utf8"}]
    assert got.events[-1][0] - got.first("stdout") >= 1.2, got.events


# -- isolation -------------------------------------------------------------------------------

def test_two_sessions_cannot_see_each_others_memory_files_or_processes(
        sessions: Sessions) -> None:
    first, second = sessions.start()["id"], sessions.start()["id"]
    sessions.run(first, "import subprocess, os\nsecret = 'first-secret'\n"
                 "open('secret.txt', 'w').write(secret)\n"
                 "sleeper = subprocess.Popen(['sleep', '300'])")
    seen = json.loads(sessions.run(second, """
import glob, json, os
print(json.dumps({"pids": sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
                  "files": sorted(glob.glob('/box/**', recursive=True))}))
""")["stdout"])
    assert seen["pids"] == [2]  # only itself
    assert "/box/secret.txt" not in seen["files"]
    listing = sessions.client.get(f"/v1/sessions/{second}/files").json()
    assert listing == {"files": [], "truncated": False}
    assert sessions.value(second, "'secret' in globals()") == "False"
    assert sessions.value(first, "sleeper.poll() is None and secret") == "'first-secret'"


def test_another_keys_session_is_not_found(runner: RunnerProcess, sessions: Sessions) -> None:
    session = sessions.start()["id"]
    other = Sessions(runner.with_key(runner.add_key("session-stranger")))
    assert other.call("GET", f"/v1/sessions/{session}").status == 404
    answer = other.client.post(f"/v1/sessions/{session}/runs", {"code": "1"})
    assert answer.status == 404 and error(answer)["code"] == "session_not_found"
    assert other.call("DELETE", f"/v1/sessions/{session}").status == 404
    assert sessions.value(session, "'still mine'") == "'still mine'"


# -- limits ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("limits", "code", "status"), [
    ({"cpu_time_s": 0.5}, "while True: pass", "time_limit"),
    ({"wall_time_s": 0.5}, "import time\ntime.sleep(60)", "wall_time_limit"),
    ({"memory_mib": 64}, "b = bytearray(200 << 20)", "memory_limit"),
    ({"output_kib": 4}, "while True: print('x' * 1000)", "output_limit"),
    ({"file_size_kib": 64}, "open('big', 'wb').write(b'x' * (1 << 20))", "file_size_limit"),
], ids=["cpu", "wall", "memory", "output", "file_size"])
def test_a_limit_ends_the_session_with_its_status(sessions: Sessions, limits: dict[str, Any],
                                                  code: str, status: str) -> None:
    session = sessions.start(limits=limits)["id"]
    assert sessions.value(session, "'alive'") == "'alive'"
    record = sessions.run(session, code)
    assert (record["status"], record["session_ended"]) == (status, True), record
    gone = sessions.client.post(f"/v1/sessions/{session}/runs", {"code": "1"})
    assert gone.status == 410 and error(gone)["code"] == "session_lost"
    assert status in error(gone)["message"]
    assert sessions.call("GET", f"/v1/sessions/{session}").status == 410


def test_the_sessions_total_cpu_time_ends_it_across_calls(sessions: Sessions) -> None:
    session = sessions.start(limits={"cpu_time_s": 1.0}, cpu_total_s=1.2)["id"]
    spin = "import time\nend = time.process_time() + 0.7\nwhile time.process_time() < end: pass"
    assert sessions.run(session, spin)["status"] == "ok"
    record = sessions.run(session, spin)
    assert (record["status"], record["session_ended"]) == ("time_limit", True)
    assert "total CPU time of 1.2 s" in record["message"]
    assert record["cpu_time_s"] < 1.0  # the call's own share, not the session's total


def test_exit_ends_the_session_and_says_so(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    record = sessions.run(session, "raise SystemExit(3)")
    assert (record["status"], record["exit_code"], record["session_ended"]) == (
        "runtime_error", 3, True)
    gone = sessions.call("GET", f"/v1/sessions/{session}")
    assert gone.status == 410 and "exited with code 3" in error(gone)["message"]


# -- the API's answers ------------------------------------------------------------------------

def test_a_call_in_progress_makes_others_wait_with_409(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    slow = threading.Thread(target=sessions.run, args=(session, "import time\ntime.sleep(2)"))
    slow.start()
    try:
        wait_until_running(sessions, session)
        busy = sessions.client.post(f"/v1/sessions/{session}/runs", {"code": "1"})
        assert busy.status == 409 and error(busy)["code"] == "session_busy"
        assert sessions.call("GET", f"/v1/sessions/{session}/files").status == 409
    finally:
        slow.join()
    assert sessions.value(session, "2") == "2"


def test_deleting_a_busy_session_cancels_its_call(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    answers: list[dict[str, Any]] = []
    slow = threading.Thread(target=lambda: answers.append(
        sessions.run(session, "import time\ntime.sleep(30)")))
    slow.start()
    wait_until_running(sessions, session)
    started = time.monotonic()
    assert sessions.delete(session) == 204
    slow.join(timeout=10)
    assert time.monotonic() - started < 5 and answers[0]["session_ended"] is True
    assert sessions.call("GET", f"/v1/sessions/{session}").status == 404


@pytest.mark.parametrize(("body", "field"), [
    ({"ttl_s": 0}, "ttl_s"), ({"idle_timeout_s": 1e9}, "idle_timeout_s"),
    ({"cpu_total_s": -1}, "cpu_total_s"), ({"limits": {"memory_mib": 1 << 30}},
                                           "limits.memory_mib"),
    ({"colour": "blue"}, "colour")])
def test_bad_terms_are_422_with_the_field(runner: RunnerProcess, body: dict[str, Any],
                                          field: str) -> None:
    answer = runner.post("/v1/sessions", body)
    assert answer.status == 422 and error(answer)["field"] == field, answer.body


def test_unknown_sessions_and_bad_file_names(runner: RunnerProcess,
                                             sessions: Sessions) -> None:
    assert sessions.call("GET", "/v1/sessions/nope").status == 404
    session = sessions.start()["id"]
    bad = sessions.call("PUT", f"/v1/sessions/{session}/files/../escape", b"x")
    assert bad.status in (404, 422)  # aiohttp resolves '..' before routing, or we refuse
    reserved = sessions.call("PUT", f"/v1/sessions/{session}/files/main.py", b"x")
    assert reserved.status == 422 and error(reserved)["code"] == "invalid_file_name"
    missing = sessions.call("GET", f"/v1/sessions/{session}/files/absent.txt")
    assert missing.status == 404 and error(missing)["code"] == "file_not_found"


def test_files_go_in_and_out_and_the_cells_see_them(sessions: Sessions) -> None:
    session = sessions.start()["id"]
    blob = bytes(range(256))
    assert sessions.call("PUT", f"/v1/sessions/{session}/files/data/blob.bin", blob).status \
        == 204
    assert sessions.value(session, "len(open('data/blob.bin', 'rb').read())") == "256"
    sessions.run(session, "import os\nos.makedirs('out', exist_ok=True)\n"
                 "open('out/result.txt', 'w').write('made in a cell')")
    listing = sessions.client.get(f"/v1/sessions/{session}/files").json()
    assert listing["files"] == [{"name": "data/blob.bin", "size": 256},
                                {"name": "out/result.txt", "size": 14}]
    got = sessions.call("GET", f"/v1/sessions/{session}/files/data/blob.bin")
    assert got.body == blob and got.headers["content-type"] == "application/octet-stream"
    assert sessions.call("DELETE", f"/v1/sessions/{session}/files/data/blob.bin").status == 204
    assert sessions.value(session, "os.path.exists('data/blob.bin')") == "False"
    directory = sessions.call("GET", f"/v1/sessions/{session}/files/data")
    assert directory.status == 422 and error(directory)["code"] == "not_a_file"


def test_a_keys_session_count_is_bounded(runner: RunnerProcess) -> None:
    keyed = Sessions(runner.with_key(runner.add_key("one-session", "--sessions", "1")))
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:  # at once: one wins, even so
            answers = list(pool.map(lambda _: keyed.client.post("/v1/sessions", {}), range(3)))
        assert sorted(a.status for a in answers) == [201, 429, 429]
        keyed.started += [a.json()["id"] for a in answers if a.status == 201]
        over = keyed.client.post("/v1/sessions", {})
        assert over.status == 429 and error(over)["code"] == "too_many_sessions"
        assert over.headers["retry-after"]
        listed = keyed.client.get("/v1/sessions").json()["sessions"]
        assert [s["id"] for s in listed] == keyed.started
    finally:
        keyed.close()


def test_runs_are_served_while_every_session_container_is_taken(
        runner: RunnerProcess, sessions: Sessions) -> None:
    for _ in range(runner.config.sessions.pool_size):
        sessions.start()
    started = time.monotonic()
    assert runner.run("print('not starved')").stdout == "not starved\n"
    assert runner.run("import pandas\nprint(pandas.__name__)").stdout == "pandas\n"
    assert time.monotonic() - started < 5


# -- ends ------------------------------------------------------------------------------------

def _host_processes_of_runs() -> list[str]:
    """Processes of the runs' uid but the runs each zygote prepares ahead (forks of it,
    confined and waiting for a request)."""
    found = subprocess.run(["pgrep", "-a", "-u", RUN_UIDS_ON_HOST], capture_output=True,
                           text=True, check=False)
    return [line for line in found.stdout.splitlines()
            if "-m stockade.sandbox.zygote" not in line]


def test_an_idle_session_is_reaped_and_leaves_nothing(runner: RunnerProcess,
                                                      sessions: Sessions) -> None:
    session = sessions.start(idle_timeout_s=1)["id"]
    sessions.run(session, "import subprocess\nsleeper = subprocess.Popen(['sleep', '300'])\n"
                 "open('left.txt', 'w').write('x')")
    assert any("sleep 300" in line for line in _host_processes_of_runs())
    deadline = time.monotonic() + 15
    while sessions.call("GET", f"/v1/sessions/{session}").status != 404:
        assert time.monotonic() < deadline, "the idle session was not reaped"
        time.sleep(0.2)
    while _host_processes_of_runs():
        assert time.monotonic() < deadline, _host_processes_of_runs()
        time.sleep(0.1)
    assert runner.metric("stockade_sessions") == 0
    # Its container serves the next session with a clean working directory.
    fresh = sessions.start()["id"]
    assert sessions.client.get(f"/v1/sessions/{fresh}/files").json()["files"] == []


def test_a_session_whose_container_died_answers_410(runner: RunnerProcess,
                                                   sessions: Sessions) -> None:
    session = sessions.start()["id"]
    assert sessions.value(session, "'before'") == "'before'"
    container = re.findall(rf'"session":"{session}","container":"([^"]+)"', runner.log())[0]
    init = subprocess.run(["lxc-info", "-P", runner.config.lxc_path, "-n", container, "-pH"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["kill", "-KILL", init], check=True)
    gone = sessions.client.post(f"/v1/sessions/{session}/runs", {"code": "'after'"})
    assert gone.status == 410 and "container failed" in error(gone)["message"], gone.body
    assert sessions.call("GET", f"/v1/sessions/{session}").status == 410
    runner.wait_for_full_pool(runner.config.all_containers)


# -- the hostile battery, inside a session ------------------------------------------------------

def _rlimits_of_a_session(result: Any, _ctx: Context) -> None:
    """As a run's, but RLIMIT_CPU is the session's total (each call's CPU is held to its
    limit from the cgroup, by the zygote)."""
    seen = stdout_json(result)
    assert seen.pop("RLIMIT_CPU") == [60, 61]
    assert seen == {
        "RLIMIT_FSIZE": [1024 * 1024] * 2, "RLIMIT_NOFILE": [256, 256],
        "RLIMIT_NPROC": [512, 512], "RLIMIT_STACK": [8 << 20] * 2, "RLIMIT_CORE": [0, 0],
        "RLIMIT_MEMLOCK": [0, 0], "RLIMIT_MSGQUEUE": [0, 0], "RLIMIT_RTPRIO": [0, 0]}


def _one_fd_the_sessions_channel(result: Any, _ctx: Context) -> None:
    assert len(stdout_json(result)) == 1  # the session's own channel to the front


IN_A_SESSION = {"rlimits_in_force": _rlimits_of_a_session,
                "no_inherited_fds": _one_fd_the_sessions_channel}


class CellAsResult:
    """A cell's record where a probe's check expects a run's."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.__dict__.update(record)


@pytest.mark.parametrize("probe", BATTERY, ids=[p.name for p in BATTERY])
def test_probe_is_contained_in_a_session(sessions: Sessions, ctx: Context,
                                         probe: Probe) -> None:
    session = sessions.start(limits=probe.limits)["id"]
    record = sessions.run(session, probe.source(ctx))
    check = IN_A_SESSION.get(probe.name, probe.check)
    check(CellAsResult(record), ctx)  # type: ignore[arg-type]
