"""The runtime's shape holds in its imports: the network-facing front never imports the
root manager (nor LXC), the channel between them imports neither side, and the sandbox
imports nothing of the runner."""

from __future__ import annotations

import ast
import subprocess
import sys
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


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("runner/front", ("stockade.runner.manager", "stockade.runner.service", "lxc")),
    ("runner/channel.py", ("stockade.runner.front", "stockade.runner.manager")),
    ("sandbox", ("stockade.runner", "lxc", "aiohttp")),
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
              " or m == 'lxc' or m == 'stockade.runner.service'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"
