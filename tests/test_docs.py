"""The docs a newcomer reads first hold to what they promise: a README of at most 150 lines
that opens with the request path, the set-up and test commands, a CONTRIBUTING and a
CHANGELOG; and the table of routes that need a key is the one the runner enforces."""

from __future__ import annotations

import re
from pathlib import Path

from stockade.runner.front import routes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_is_a_five_minute_read() -> None:
    assert len(README.splitlines()) <= 150


def test_the_readme_opens_with_the_request_path() -> None:
    """Its first code block is the diagram: client, nginx, front, then the zygote; and the
    manager with its containers."""
    diagram = README.split("```", 2)[1]
    hops = [diagram.find(word) for word in ("client", "nginx", "front", "zygote")]
    assert -1 not in hops and hops == sorted(hops), diagram
    assert re.search(r"manager.*──>.*containers", diagram), diagram


def test_the_readme_keeps_its_two_commands() -> None:
    assert re.search(r"<!-- fresh-test: set-up -->\s*```sh\nmake run\n```", README)
    assert "```sh\nmake test\n```" in README


def test_contributing_and_changelog_are_there() -> None:
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    assert ".venv/bin/pytest tests/" in contributing and "make lint" in contributing
    assert "## " in (ROOT / "CHANGELOG.md").read_text()


def test_the_docs_say_which_routes_need_a_key() -> None:
    text = (ROOT / "docs" / "runner.md").read_text()
    table = text.split("<!-- keyed routes -->", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for path, scope in re.findall(r"^\| `[A-Z, ]+ (\S+)` \| `(\w+)` \|$", table, re.MULTILINE):
        documented[path] = scope
    assert documented == routes.keyed()
