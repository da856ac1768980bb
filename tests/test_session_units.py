"""Sessions' own logic, without containers: the driver's kernel and files, the wire's
frames, terms and their caps, the session table's answers, the REPL's cells; and
`stockade session` against a real runner."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stockade import protocol, wire
from stockade.client.repl import cells
from stockade.limits import Limits
from stockade.result import FileEntry, Result, RichOutput, Status
from stockade.runner.config import RunnerConfig, SessionPolicy
from stockade.runner.front import schema
from stockade.runner.front.runs import retire_reason
from stockade.runner.front.schema import ApiError
from stockade.runner.front.session_channel import SessionChannel
from stockade.runner.front.sessions import Session, Sessions, this_node
from stockade.runner.local import RunnerProcess
from stockade.sandbox import session_driver
from stockade.sandbox.session_driver import Caps, Kernel

STOCKADE = [sys.executable, "-m", "stockade"]


# -- the driver ------------------------------------------------------------------------------

@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    """A kernel in this process, with __main__, stdin and the display hook put back after."""
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    monkeypatch.setattr(sys, "stdin", sys.stdin)
    monkeypatch.setattr(sys, "displayhook", sys.displayhook)
    yield Kernel(Caps(max_outputs=3, max_output_bytes=100, max_file_bytes=10))


def test_a_cells_last_expression_is_shown_and_names_persist(kernel: Kernel) -> None:
    assert kernel.run_cell(protocol.Cell("x = 2")) == protocol.CellDone(False)
    done = kernel.run_cell(protocol.Cell("y = x * 21\ny"))
    assert done.outputs == [RichOutput("text/plain", "42")]
    walrus = kernel.run_cell(protocol.Cell("(z := y + 1)"))  # binds in the namespace too
    assert walrus.outputs[0].data == "43"
    assert kernel.run_cell(protocol.Cell("z")).outputs[0].data == "43"
    assert kernel.run_cell(protocol.Cell("print(y); None")).outputs == []
    assert kernel.run_cell(protocol.Cell("input()", stdin="typed\n")).outputs[0].data \
        == "'typed'"


def test_display_shows_each_value_and_the_caps_hold(kernel: Kernel) -> None:
    done = kernel.run_cell(protocol.Cell("for i in range(5): display(i)"))
    assert [o.data for o in done.outputs] == ["0", "1", "2"] and done.outputs_truncated
    big = kernel.run_cell(protocol.Cell("'x' * 500"))
    assert big.outputs == [] and big.outputs_truncated  # over the byte cap


def test_a_value_with_html_shows_both_forms(kernel: Kernel) -> None:
    code = ("class Table:\n    def __repr__(self): return 'T'\n"
            "    def _repr_html_(self): return '<table></table>'\nTable()")
    done = kernel.run_cell(protocol.Cell(code))
    assert [(o.mime, o.data) for o in done.outputs] == [("text/plain", "T"),
                                                       ("text/html", "<table></table>")]


def test_an_error_is_reported_and_its_traceback_starts_at_the_cell(
        kernel: Kernel, capsys: pytest.CaptureFixture[str]) -> None:
    done = kernel.run_cell(protocol.Cell("a = 1\n1 / 0"))
    assert done.error is True
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and 'File "<cell 1>", line 2' in err
    assert "1 / 0" in err and "session_driver" not in err
    assert kernel.run_cell(protocol.Cell("a")).outputs[0].data == "1"
    syntax = kernel.run_cell(protocol.Cell("def"))
    assert syntax.error and "SyntaxError" in capsys.readouterr().err


def test_file_operations_stay_in_the_workdir_and_never_follow_a_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_driver, "WORKDIR", str(tmp_path))
    caps = Caps(max_file_bytes=10)
    assert session_driver.file_op(protocol.FilePut("a/b.txt", b"hello"), caps) == \
        protocol.OpDone()
    assert session_driver.file_op(protocol.FileGet("a/b.txt"), caps) == \
        protocol.FileData(b"hello")
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / protocol.CODE_FILE).write_text("boot")
    (tmp_path / "big").write_bytes(b"x" * 11)
    assert session_driver.file_op(protocol.FileGet("link"), caps).reason == "not_a_file"
    assert session_driver.file_op(protocol.FileGet("a"), caps).reason == "not_a_file"
    assert session_driver.file_op(protocol.FileGet("big"), caps).reason == "too_large"
    assert session_driver.file_op(protocol.FileGet("nope"), caps).reason == "not_found"
    put_over_link = session_driver.file_op(protocol.FilePut("link", b"x"), caps)
    assert put_over_link.reason == "invalid"  # O_NOFOLLOW: ELOOP
    listing = session_driver.file_op(protocol.FileList(), caps)
    assert listing == protocol.FileEntries([FileEntry("a/b.txt", 5),
                                            FileEntry("big", 11)])
    assert session_driver.file_op(protocol.FileDelete("a/b.txt"), caps) == protocol.OpDone()
    assert not (tmp_path / "a" / "b.txt").exists()


# -- the wire --------------------------------------------------------------------------------

def test_frames_are_whole_single_and_capped() -> None:
    body = protocol.frame(protocol.OpDone())
    reader = protocol.FrameReader(limit=100)
    assert reader.feed(body[:3]) is None
    assert protocol.decode_session_answer(reader.feed(body[3:]) or b"") == protocol.OpDone()
    with pytest.raises(protocol.ProtocolError, match="over the 100 cap"):
        protocol.FrameReader(100).feed((101).to_bytes(4, "big"))
    with pytest.raises(protocol.ProtocolError, match="more than one"):
        protocol.FrameReader(100).feed(body + body)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_session_answer(b"\x81\xa1x\x01")


def test_a_session_that_died_with_our_request_unread_is_an_end_not_an_error() -> None:
    """Its socket is reset, not closed: the front reads that as the channel's end (the
    zygote's report says how the session ended), never as stockade failing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = SessionChannel(ours, Limits(), Caps())
    channel.control = ours
    ours.sendall(protocol.frame(protocol.Cell("1")))
    theirs.close()  # with our cell unread
    assert channel._recv_control() == b""
    ours.close()


# -- terms and the table -----------------------------------------------------------------------

def test_terms_default_and_are_held_to_their_caps() -> None:
    config = RunnerConfig()
    assert schema.session_terms(wire.SessionRequest(), config) == (600.0, 3600.0, 60.0)
    assert schema.session_terms(wire.SessionRequest(ttl_s=5), config)[1] == 5.0
    for name, value in (("ttl_s", 0.0), ("idle_timeout_s", 1e9), ("cpu_total_s", float("nan"))):
        with pytest.raises(ApiError) as refused:
            schema.session_terms(wire.SessionRequest(**{name: value}), config)
        assert (refused.value.status, refused.value.field) == (422, name)


@pytest.mark.parametrize(("policy", "message"), [
    ({"pool_size": -1}, "pool_size"), ({"ttl_s": 10, "max_ttl_s": 5}, "ttl_s"),
    ({"max_ttl_s": 1e9, "ttl_s": 10}, "a week"), ({"max_outputs": 0}, "max_outputs")])
def test_a_bad_session_policy_is_refused(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionPolicy(**policy)


def _session(owner: str, **overrides: Any) -> Session:
    channel = SimpleNamespace(cpu_used=0.0, memory_peak_kib=0)
    values: dict[str, Any] = {"id": "s1", "owner": owner, "lease": None, "channel": channel,
                              "limits": None, "idle_timeout_s": 10.0, "ttl_s": 100.0,
                              "cpu_total_s": 60.0}
    return Session(**(values | overrides))


def test_only_the_owner_finds_a_session_and_a_lost_one_is_410() -> None:
    table = Sessions.__new__(Sessions)
    table.live, table.lost, table.node, table.incarnation = {}, {}, "", "0000abcd"
    table.metrics = SimpleNamespace(sessions=0)
    session = _session("alice")
    table.live[session.id] = session
    assert table.find("alice", "s1") is session
    with pytest.raises(ApiError) as stranger:
        table.find("bob", "s1")
    assert stranger.value.status == 404
    table._forget(session, "time_limit: CPU time limit of 1 s exceeded")
    with pytest.raises(ApiError) as lost:
        table.find("alice", "s1")
    assert lost.value.status == 410 and "CPU time limit" in lost.value.message
    with pytest.raises(ApiError) as still_stranger:
        table.find("bob", "s1")
    assert still_stranger.value.status == 404


def test_a_session_of_another_host_or_runner_start_is_410_an_unknown_one_404(
        tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    assert this_node(machine_id) == "0123456789ab"
    assert this_node(tmp_path / "absent") == ""
    table = Sessions.__new__(Sessions)
    table.live, table.lost, table.node, table.incarnation = {}, {}, "0123456789ab", "0000abcd"
    made = table.new_id()
    node, incarnation, secret = made.split(".")
    assert (node, incarnation, len(secret)) == ("0123456789ab", "0000abcd", 32)
    for elsewhere, why in ((f"ba9876543210.0000abcd.{secret}", "replaced"),
                           (f"0123456789ab.ffff0000.{secret}", "restarted")):
        with pytest.raises(ApiError) as lost:
            table.find("alice", elsewhere)
        assert lost.value.status == 410 and why in lost.value.message
    for unknown in (made, "no-such-session", f"0123456789ab.0000abcd.{'0' * 32}"):
        with pytest.raises(ApiError) as never:
            table.find("alice", unknown)
        assert never.value.status == 404
    table.node = ""  # a host without a machine id: ids without a node
    assert len(table.new_id().split(".")) == 2


def test_a_session_expires_when_idle_or_old_but_not_while_busy() -> None:
    session = _session("alice")
    now = session.started
    assert session.expired(now + 5) is None
    assert session.expired(now + 11) == "idle"
    session.busy = True
    assert session.expired(now + 11) is None
    assert session.expired(now + 100) == "expired"


def test_a_session_the_front_cancelled_does_not_cost_its_container() -> None:
    config = RunnerConfig()
    lease = SimpleNamespace(connection=object(), runs=1, since=time.monotonic())
    cancelled = Result(status=Status.SIGNALED, signal="SIGKILL")
    assert retire_reason(config, lease, cancelled, cancelled=True) is None  # type: ignore[arg-type]
    assert retire_reason(config, lease, cancelled) == "signaled"  # type: ignore[arg-type]


# -- the REPL --------------------------------------------------------------------------------

def test_the_repl_gathers_inputs_as_pythons_does() -> None:
    lines = iter(["x = 1", "def f():", "    return 2", "", "f()", "", "for i in []:"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert list(cells(read, interactive=False)) == [
        "x = 1", "def f():\n    return 2\n", "f()", "for i in []:"]


def test_stockade_session_runs_cells_prints_values_and_saves_figures(
        runner: RunnerProcess, tmp_path: Path) -> None:
    script = ("x = 6 * 7\nx\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
              "print('printed')\nprint(open('in/data.csv').read().split(',')[1])\n")
    data = tmp_path / "local.csv"
    data.write_text("a,from-the-file")
    done = subprocess.run([*STOCKADE, "session", f"--url=http://127.0.0.1:{runner.port}",
                           "--out", str(tmp_path), "--file", f"in/data.csv={data}"],
                          input=script.encode(), capture_output=True, timeout=120, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "42\n" in out and "printed\n" in out and "from-the-file\n" in out
    saved = tmp_path / "stockade-output-1.png"
    assert f"[image/png saved to {saved}]" in out
    assert saved.read_bytes().startswith(b"\x89PNG")
    assert runner.get("/v1/sessions").json() == {"sessions": []}  # it ended with the input


def test_stockade_session_says_when_a_limit_ended_it(runner: RunnerProcess) -> None:
    done = subprocess.run([*STOCKADE, "session", f"--url=http://127.0.0.1:{runner.port}",
                           "--cpu-time", "0.3"], input=b"while True: pass\n1\n",
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 1
    assert b"stockade: time_limit: CPU time limit of 0.3 s exceeded" in done.stderr
