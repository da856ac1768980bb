"""The Python client (`stockade.client`) against a live runner: runs, streams, sessions and
files both ways, blocking and asyncio, and its errors in the API's words; and that it runs
with nothing but what `stockade[client]` requires (no server dependency, no server
module)."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from stockade import client
from stockade.runner.local import RunnerProcess

SRC = Path(__file__).resolve().parents[1] / "src" / "stockade"

PROGRAM = """import os, sys
data = open("in.bin", "rb").read()
os.makedirs("out/sub", exist_ok=True)
open("out/sub/twice.bin", "wb").write(data * 2)
open("out/note.txt", "w").write(sys.argv[1] + sys.stdin.read())
print(len(data))
"""


def url(runner: RunnerProcess) -> str:
    return f"http://127.0.0.1:{runner.port}"


def test_a_run_sends_files_stdin_and_args_and_brings_back_out(runner: RunnerProcess,
                                                              tmp_path: Path) -> None:
    with client.Client(url(runner)) as runner_api:
        result = runner_api.run(PROGRAM, stdin="-in", args=["arg"],
                                files={"in.bin": b"\x00\xff"}, limits={"cpu_time_s": 5})
    assert (result.status, result.stdout) == ("ok", "2\n"), result
    saved = client.save_files(result.files, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in saved) == \
        ["out/note.txt", "out/sub/twice.bin"]
    assert (tmp_path / "out/sub/twice.bin").read_bytes() == b"\x00\xff" * 2
    assert (tmp_path / "out/note.txt").read_text() == "arg-in"


def test_a_programs_failure_is_a_result_and_a_refusal_is_an_api_error(
        runner: RunnerProcess) -> None:
    with client.Client(url(runner)) as runner_api:
        assert runner_api.run("while True: pass", limits={"cpu_time_s": 0.2}).status == \
            client.Status.TIME_LIMIT
        with pytest.raises(client.ApiError) as caught:
            runner_api.run("print(1)", limits={"memory_mib": 999_999})
        with pytest.raises(client.ApiError) as unknown:
            runner_api.run("print(1)", environment="cobol-85")
    error = caught.value
    assert (error.status, error.code, error.field) == (422, "limit_out_of_range",
                                                       "limits.memory_mib"), error
    assert error.request_id and error.request_id in str(error)
    assert unknown.value.field == "environment" and "cobol-85" in unknown.value.message


def test_a_stream_gives_the_output_as_it_is_written_then_the_record(
        runner: RunnerProcess) -> None:
    code = "import sys, time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b', file=sys.stderr)"
    with client.Client(url(runner)) as runner_api, runner_api.stream(code) as stream:
        outputs = list(stream)
        assert stream.result.status == "ok"
    assert outputs == [client.Output("stdout", "a\n"), client.Output("stderr", "b\n")]


def test_a_session_keeps_its_state_and_files_both_ways(runner: RunnerProcess) -> None:
    with client.Client(url(runner)) as runner_api:
        with runner_api.session(files={"data/in.txt": "21"}) as session:
            assert session.run("x = int(open('data/in.txt').read())").status == "ok"
            cell = session.run("x * 2")
            assert cell.outputs == [client.RichOutput("text/plain", "42")], cell
            with session.stream("print(x, flush=True)") as stream:
                assert [o.text for o in stream] == ["21\n"]
                assert stream.result.status == "ok"
            session.run("open('made.bin', 'wb').write(bytes(range(3)))")
            session.upload("up.bin", b"\x01\x02")
            assert {f.name: f.size for f in session.files()} == \
                {"data/in.txt": 2, "made.bin": 3, "up.bin": 2}
            assert session.download("made.bin") == b"\x00\x01\x02"
            session.remove("up.bin")
            assert "up.bin" not in {f.name for f in session.files()}
            assert session.refresh().calls >= 4
            assert session.id in {s.id for s in runner_api.sessions()}
        with pytest.raises(client.ApiError) as ended:
            session.run("x")
        session.end()  # ended already: nothing to do
    assert ended.value.status == 404 and ended.value.code == "session_not_found"


def test_a_sessions_figure_comes_back_as_png(runner: RunnerProcess) -> None:
    code = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nNone"
    with client.Client(url(runner)) as runner_api, runner_api.session() as session:
        cell = session.run(code)
    figures = [o for o in cell.outputs if o.mime == "image/png"]
    assert len(figures) == 1, cell
    assert base64.b64decode(figures[0].data).startswith(b"\x89PNG")


def test_the_async_client_runs_streams_and_keeps_sessions(runner: RunnerProcess) -> None:
    async def scenario() -> None:
        async with client.AsyncClient(url(runner)) as runner_api:
            results = await asyncio.gather(*(runner_api.run(f"print({i})") for i in range(4)))
            assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
            async with runner_api.stream("print('s')") as stream:
                assert [o.text async for o in stream] == ["s\n"]
                assert (await stream.result()).status == "ok"
            async with await runner_api.session(files={"f.txt": "7"}) as session:
                await session.run("y = int(open('f.txt').read())")
                assert (await session.run("y + 1")).outputs[0].data == "8"
                assert await session.download("f.txt") == b"7"
            environments = await runner_api.environments()
            assert environments.default in {e.name for e in environments.environments}

    asyncio.run(scenario())


def _requirements(name: str, extras: set[str], seen: set[str]) -> None:
    """`name` with `extras`, and what it requires (installed), with their markers applied."""
    if name in seen:
        return
    seen.add(name)
    for line in importlib.metadata.distribution(name).requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in extras | {""}):
            _requirements(requirement.name.lower(), requirement.extras, seen)


def _client_only_path(where: Path) -> Path:
    """A directory holding only the stockade package and what `stockade[client]` requires:
    what `pip install 'stockade[client]'` brings."""
    site = where / "site"
    site.mkdir()
    needed: set[str] = set()
    _requirements("stockade", {"client"}, needed)
    (site / "stockade").symlink_to(SRC)
    for name in needed - {"stockade"}:
        dist = importlib.metadata.distribution(name)
        tops = {f.parts[0] for f in dist.files or []
                if not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] != ".."
                and f.parts[0] != "__pycache__"}
        for top in tops:
            (site / top).symlink_to(Path(str(dist.locate_file(top))))
    return site


CLIENT_ONLY = """import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
from stockade import client
with client.Client(sys.argv[2]) as runner, runner.session() as session:
    result = runner.run("print(6 * 7)")
    cell = session.run("6 * 7")
server = [m for m in sys.modules if m.startswith(("stockade.runner", "stockade.sandbox",
                                                  "stockade.protocol"))]
print(json.dumps({"stdout": result.stdout, "cell": cell.outputs[0].data, "server": server,
                  "aiohttp": importlib.util.find_spec("aiohttp") is not None}))
"""


def test_the_client_needs_nothing_of_the_server(runner: RunnerProcess, tmp_path: Path) -> None:
    site = _client_only_path(tmp_path)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", CLIENT_ONLY, str(site),
                           url(runner)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"stdout": "42\n", "cell": "42", "server": [],
                                       "aiohttp": False}


def test_the_readmes_python_example_runs_as_written(runner: RunnerProcess) -> None:
    readme = (SRC.parents[1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", example.replace(
        "http://127.0.0.1:8080", url(runner))], capture_output=True, text=True, timeout=120,
        check=False)
    assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr[-2000:]
