"""`make uninstall` removes LXC's template cache of a Debian release only where stockade's
build made it (tools/lxc-cache, which the image builds call before they bootstrap)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "lxc-cache"
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                      check=True).stdout.strip()


def lxc_cache(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOOL), *args], env={**os.environ, "LXC_CACHE_PATH": str(cache)},
                          capture_output=True, text=True, check=True)


def bootstrap(cache: Path, suite: str) -> Path:
    """What LXC's debian template leaves: a rootfs of the release."""
    rootfs = cache / "debian" / f"rootfs-{suite}-{ARCH}"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "debian_version").write_text("12\n")
    return rootfs


def test_a_cache_stockade_made_is_removed_one_it_found_is_kept(tmp_path: Path) -> None:
    theirs = bootstrap(tmp_path, "bookworm")  # there before stockade's first build
    for suite in ("bookworm", "trixie"):
        lxc_cache(tmp_path, "note", suite)
    ours = bootstrap(tmp_path, "trixie")
    lxc_cache(tmp_path, "note", "trixie")  # a later build of the same release
    done = lxc_cache(tmp_path, "forget")
    assert not ours.exists() and f"removed {ours}" in done.stdout
    assert theirs.is_dir(), "a cache stockade did not make was removed"
    assert sorted(p.name for p in (tmp_path / "debian").iterdir()) == [theirs.name]


def test_forget_with_nothing_made_removes_nothing(tmp_path: Path) -> None:
    theirs = bootstrap(tmp_path, "bookworm")
    assert lxc_cache(tmp_path, "forget").stdout == ""
    assert theirs.is_dir()
    empty = tmp_path / "elsewhere"
    lxc_cache(empty, "note", "bookworm")
    lxc_cache(empty, "forget")
    assert not (empty / "debian").exists()
