"""Every status of the result record is reachable, and stdin, args and files work."""

from __future__ import annotations

import pytest

from stockade.protocol import InputFile
from support.sandbox import Sandbox


def test_ok_with_measurements(sandbox: Sandbox) -> None:
    result = sandbox.run("print(1)")
    assert (result.status, result.exit_code, result.signal) == ("ok", 0, None)
    assert result.stdout == "1\n" and result.stderr == "" and result.message == ""
    assert 0 < result.wall_time_s < 1 and 0 <= result.cpu_time_s < 1
    assert result.memory_peak_kib > 0


def test_stdin_args_and_files(sandbox: Sandbox) -> None:
    code = "import sys\nprint(sys.stdin.read().upper(), sys.argv[1:], open('data/in.csv').read())"
    files = [InputFile("data/in.csv", b"a,b\n")]
    result = sandbox.run(code, stdin=b"hello", args=["-x", "y z"], files=files)
    assert result.stdout == "HELLO ['-x', 'y z'] a,b\n\n", result


def test_runtime_error_has_the_interpreters_traceback(sandbox: Sandbox) -> None:
    result = sandbox.run("x = 1\nraise ValueError('boom')")
    assert (result.status, result.exit_code) == ("runtime_error", 1)
    assert result.stderr == ('Traceback (most recent call last):\n'
                             '  File "/box/main.py", line 2, in <module>\n'
                             "    raise ValueError('boom')\nValueError: boom\n")


@pytest.mark.parametrize(("code", "exit_code"), [
    ("import sys; sys.exit(3)", 3), ("raise SystemExit('bye')", 1), ("x = (", 1)])
def test_exit_codes(sandbox: Sandbox, code: str, exit_code: int) -> None:
    result = sandbox.run(code)
    assert (result.status, result.exit_code) == ("runtime_error", exit_code)
    assert result.message == f"exited with code {exit_code}"


def test_sys_exit_zero_is_ok(sandbox: Sandbox) -> None:
    assert sandbox.run("import sys; print('x'); sys.exit(0)").status == "ok"


def test_signaled(sandbox: Sandbox) -> None:
    result = sandbox.run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert (result.status, result.signal, result.exit_code) == ("signaled", "SIGSEGV", None)
    assert result.message == "killed by SIGSEGV"


def test_threads_and_atexit_finish_before_exit(sandbox: Sandbox) -> None:
    code = ("import atexit, threading, time\natexit.register(lambda: print('atexit'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.05), print('thread'))).start()")
    assert sandbox.run(code).stdout == "thread\natexit\n"


def test_random_differs_between_runs(sandbox: Sandbox) -> None:
    code = "import random; print(random.random())"
    assert sandbox.run(code).stdout != sandbox.run(code).stdout


def test_program_writes_and_reads_its_workdir_and_tmp(sandbox: Sandbox) -> None:
    code = ("open('a.txt', 'w').write('1'); open('/tmp/b', 'w').write('2');"
            "print(open('a.txt').read() + open('/tmp/b').read())")
    assert sandbox.run(code).stdout == "12\n"


def test_cpu_time_is_measured_across_processes(sandbox: Sandbox) -> None:
    code = ("import os, time\nif os.fork() == 0:\n    t = time.process_time()\n"
            "    while time.process_time() - t < 0.3: pass\n    os._exit(0)\nos.wait()")
    result = sandbox.run(code)
    assert result.status == "ok" and result.cpu_time_s >= 0.3, result


def test_large_output_within_the_cap_arrives_whole(sandbox: Sandbox) -> None:
    # A fast writer must block on a full pipe, not fail with EAGAIN.
    code = "import sys\nfor _ in range(64): sys.stdout.write('y' * 16384)\nsys.stdout.flush()"
    result = sandbox.run(code, output_kib=1024)
    assert result.status == "ok" and result.stdout == "y" * (64 * 16384), result.message


def test_runs_that_leave_processes_behind_always_get_their_status(sandbox: Sandbox) -> None:
    """Found by the soak: the run's init must read everything the zygote sent it before
    exiting, or the zygote's read of its report fails (ECONNRESET) and a clean run became
    an internal_error, at random."""
    daemon = "import os\nif os.fork() == 0:\n    import time; time.sleep(600)"
    bomb = "import os\nwhile True: os.fork()"
    for _ in range(25):
        assert sandbox.run(daemon).status == "ok"
        assert sandbox.run(bomb).status == "runtime_error"
