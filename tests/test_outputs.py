"""Files the program leaves under out/ come back with the result: regular files only,
within the caps, never through a symlink or a hard link the program planted."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable

from stockade.runner.local import RunnerProcess
from support.sandbox import Sandbox


def names(result: object) -> dict[str, str]:
    return {f.name: f.content for f in result.files}  # type: ignore[attr-defined]


def test_text_and_binary_files_come_back(sandbox: Sandbox) -> None:
    result = sandbox.run("import os\nos.makedirs('out/deep/er')\n"
                         "open('out/a.txt', 'w').write('text')\n"
                         "open('out/deep/er/b.bin', 'wb').write(bytes([0, 255]))\n"
                         "open('not-out.txt', 'w').write('stays')")
    assert result.status == "ok", result.stderr
    files = {f.name: (f.content, f.encoding) for f in result.files}
    assert files == {"a.txt": ("text", "utf8"),
                     "deep/er/b.bin": (base64.b64encode(bytes([0, 255])).decode(), "base64")}
    assert not result.files_truncated


def test_symlinks_and_hard_links_are_not_followed(sandbox: Sandbox) -> None:
    result = sandbox.run("import os\nos.mkdir('out')\n"
                         "os.symlink('/etc/passwd', 'out/passwd')\n"
                         "os.symlink('/etc', 'out/etc')\n"
                         "open('secret', 'w').write('mine')\nos.link('secret', 'out/hard')\n"
                         "open('out/plain', 'w').write('ok')")
    assert result.status == "ok", result.stderr
    assert names(result) == {"plain": "ok"}
    assert result.files_truncated


def test_out_itself_as_a_symlink_gives_nothing(sandbox: Sandbox) -> None:
    result = sandbox.run("import os\nos.symlink('/etc', 'out')")
    assert (result.status, result.files) == ("ok", [])


def test_caps_on_count_and_size(sandbox: Sandbox) -> None:
    many = sandbox.run("import os\nos.mkdir('out')\n"
                       "for i in range(40): open(f'out/{i:02}', 'w').write('x')")
    assert len(many.files) == sandbox.config.max_out_files and many.files_truncated
    big = sandbox.run("import os\nos.mkdir('out')\n"
                      "open('out/big', 'wb').write(b'x' * (2 << 20))\n"
                      "open('out/small', 'w').write('s')", file_size_kib=4096)
    assert names(big) == {"small": "s"} and big.files_truncated


def test_a_directory_of_many_names_is_looked_at_only_in_part(sandbox: Sandbox) -> None:
    """Empty files cost a tmpfs nothing: the collector looks at 4096 names at most."""
    result = sandbox.run("import os\nos.mkdir('out')\n"
                         "for i in range(20000): open(f'out/z{i}', 'w').close()",
                         wall_time_s=20, cpu_time_s=10)
    assert result.status == "ok", result.stderr
    assert result.files_truncated and len(result.files) == sandbox.config.max_out_files


def test_a_daemon_cannot_swap_files_while_they_are_read(sandbox: Sandbox) -> None:
    result = sandbox.run("import os, time\nos.mkdir('out')\nopen('out/f', 'w').write('v1')\n"
                         "if os.fork() == 0:\n"
                         "    time.sleep(0.05)\n"
                         "    os.remove('out/f'); os.symlink('/etc/shadow', 'out/f')\n"
                         "    time.sleep(60)\n")
    assert result.status == "ok"
    assert names(result) == {"f": "v1"}  # the daemon was killed before the walk


def test_files_come_back_over_http(runner: RunnerProcess) -> None:
    result = runner.run("import os\nos.mkdir('out')\n"
                        "open('out/result.csv', 'w').write(open('in.csv').read().upper())",
                        files=[{"name": "in.csv", "content": "a,b\n"}])
    assert result.status == "ok", result.stderr
    assert [(f.name, f.content, f.encoding) for f in result.files] == [
        ("result.csv", "A,B\n", "utf8")]


def test_collecting_never_signals_outside_the_run(weak_sandbox: Callable[[str], Sandbox]) -> None:
    """The collector kills the run's leftovers with kill(-1), which only a pid namespace's
    init may do: a zygote configured without pid namespaces must not reach the host."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        box = weak_sandbox("pid")
        result = box.run("import os\nos.mkdir('out')\nopen('out/f', 'w').write('x')")
        assert names(result) == {"f": "x"}
        assert bystander.poll() is None, "a host process was killed by the collector"
    finally:
        bystander.kill()
        bystander.wait()
