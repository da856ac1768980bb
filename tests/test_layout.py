"""The runtime's shape holds in its imports: the network-facing front never imports the
root manager (nor LXC), the channel between them imports neither side, the sandbox imports
nothing of the runner, and the client callers import has no server code; and the installed
entry points load only their own process's code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import stockade

PACKAGE = Path(stockade.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


SERVER = ("stockade.runner", "stockade.sandbox", "stockade.cli", "stockade.launcher", "lxc",
          "aiohttp")


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("runner/front", ("stockade.runner.manager", "stockade.launcher", "lxc")),
    ("runner/channel.py", ("stockade.runner.front", "stockade.runner.manager")),
    ("runner/lifecycle.py", ("stockade.runner.front", "stockade.runner.manager")),
    ("sandbox", ("stockade.runner", "stockade.client", "stockade.launcher", "lxc", "aiohttp")),
    ("client", SERVER),
    ("wire.py", SERVER),
])
def test_no_module_reaches_across(folder: str, forbidden: tuple[str, ...]) -> None:
    paths = modules_of(folder) if (PACKAGE / folder).is_dir() else [PACKAGE / folder]
    assert paths
    for path in paths:
        bad = {name for name in imported_modules(path)
               if any(name == f or name.startswith(f"{f}.") for f in forbidden)}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_loading_the_whole_front_loads_no_manager_code() -> None:
    """The same at run time: what the front imports, transitively."""
    fronts = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
              for p in modules_of("runner/front")]
    script = ("import importlib, sys\n"
              f"for name in {fronts!r}: importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m.startswith('stockade.runner.manager')"
              " or m == 'lxc'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


ENTRY = Path(sys.executable).parent / "stockade"  # the installed console script
MANAGER = ("lxc", "stockade.runner.manager", "stockade.launcher")


def imported_by(argv: list[str], *, as_user: int | None = None,
                stdin: str = "") -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Every module the installed entry point imported before it ended (Python's own
    -X importtime report, one line a module)."""
    prefix = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"] \
        if as_user is not None else []
    done = subprocess.run([*prefix, str(ENTRY), *argv], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    names = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return names, done


def reached(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f"{f}.") for f in forbidden))


def test_the_front_entry_loads_no_manager_code() -> None:
    """`stockade front`, as the unprivileged user it runs as, up to where it waits for its
    manager (none answers here): no LXC, no manager module, no manager entry."""
    with tempfile.TemporaryDirectory(prefix="stockade-layout-") as where:
        Path(where).chmod(0o755)  # the user may look for the socket there
        names, done = imported_by(["front", "--socket", f"{where}/front.sock", "--wait", "1"],
                                  as_user=65534)
    assert "no pool manager listens" in done.stderr, done.stderr[-2000:]
    assert "stockade.runner.front.main" in names and "aiohttp" in names
    assert reached(names, MANAGER) == []


@pytest.mark.parametrize("argv", [["run", "--url", "http://127.0.0.1:9/", "PROGRAM"],
                                  ["session", "--url", "http://127.0.0.1:9/"]])
def test_the_client_commands_load_neither_process(tmp_path: Path, argv: list[str]) -> None:
    """`stockade run` and `stockade session` against a runner that is not there (port 9 of
    this host's loopback): the client, and nothing of the front, the manager or LXC."""
    program = tmp_path / "hello.py"
    program.write_text("print(1)\n")
    names, done = imported_by([str(program) if a == "PROGRAM" else a for a in argv])
    assert done.returncode != 0 and "127.0.0.1:9" in done.stderr, done.stderr[-2000:]
    assert "stockade.client.sync" in names
    assert reached(names, (*MANAGER, "stockade.runner.front", "aiohttp")) == []


MAX_LINES = 450  # past it, a module splits by responsibility


def test_no_module_is_over_the_line_cap() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_docs_layout_lists_every_module() -> None:
    """docs/runner.md's Layout block names each module under its folder, and no other."""
    text = (PACKAGE.parents[1] / "docs" / "runner.md").read_text()
    block = text.split("```\nsrc/stockade/\n", 1)[1].split("\ntests/", 1)[0]
    listed, folders = set(), []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        if depth < 0 or not line.strip() or (not line.lstrip()[0].isalpha() and \
                not line.lstrip().startswith("_")):
            continue
        names = [n.strip() for n in line.lstrip().split("  ")[0].split(",")]
        if names[0].endswith("/"):
            folders[depth:] = [names[0]]
            continue
        listed.update("".join(folders[:depth]) + n for n in names if n.endswith(".py"))
    real = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py" or p.parent == PACKAGE}
    assert sorted(real - listed) == [] and sorted(listed - real) == []
