"""Sandbox image archives: what `images export` writes, `images import` turns back into the
same image on another host path; an archive of other sandbox code is refused; `import-rootfs`
refuses a rootfs that does not carry this code; a runner imports its image from its archive
directory at start and refuses to start without one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.runner.config import RunnerConfig
from stockade.runner.local import RunnerProcess, runner_config
from stockade.runner.manager import images
from support.leftovers import runner_leftovers

STOCKADE = [sys.executable, "-m", "stockade"]


def stockade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STOCKADE, *args], capture_output=True, text=True, timeout=600,
                          check=False)


def listing(rootfs: Path) -> list[str]:
    """Every entry with owner, group, mode and (for files) size: what an import must keep."""
    done = subprocess.run(["find", ".", "-printf", r"%p %U %G %m %y %s\n"], cwd=rootfs,
                          capture_output=True, text=True, check=True)
    return sorted(line.rsplit(" ", 1)[0] if " d " in line else line
                  for line in done.stdout.splitlines())


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    status = stockade("images", "status")
    assert status.returncode == 0, f"{status.stdout}: run `make sandbox-image` first"
    out = tmp_path_factory.mktemp("export")
    done = stockade("images", "export", "--output", str(out))
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def config_file(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "runner.json"
    path.write_text(json.dumps(values))
    return path


def test_import_recreates_the_image_with_owners_and_modes(archive: Path,
                                                         tmp_path: Path) -> None:
    source = RunnerConfig()
    target = RunnerConfig(lxc_path=str(tmp_path / "lxc"))
    cfg = config_file(tmp_path, lxc_path=target.lxc_path)
    first = stockade("images", "import", "--config", str(cfg), str(archive))
    assert first.returncode == 0 and "installed" in first.stdout, first.stderr
    assert images.is_current(target)
    assert listing(images.image_dir(target) / "rootfs") == \
        listing(images.image_dir(source) / "rootfs")
    # The host config is written for the importing host's own paths.
    assert f"dir:{images.image_dir(target)}/rootfs" in (
        images.image_dir(target) / "config").read_text()
    again = stockade("images", "import", "--config", str(cfg), str(archive))
    assert again.returncode == 0 and "is current" in again.stdout, again.stderr


@pytest.mark.usefixtures("archive")  # builds the current image
def test_image_holds_no_set_id_file() -> None:
    """Nothing in a container gains privileges by exec, and RestrictSUIDSGID hosts can
    import the image."""
    rootfs = images.image_dir(RunnerConfig()) / "rootfs"
    found = subprocess.run(["find", str(rootfs), "-xdev", "-perm", "/6000"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == []


def test_import_refuses_an_archive_of_other_sandbox_code(tmp_path: Path) -> None:
    (tmp_path / images.STAMP).write_text(json.dumps({
        "digest": "0" * 64, "built_at": 0, "python": "3.11", "packages": []}))
    (tmp_path / "rootfs" / "usr").mkdir(parents=True)
    forged = tmp_path / "other.tar.gz"
    with tarfile.open(forged, "w:gz") as tar:
        tar.add(tmp_path / images.STAMP, arcname=images.STAMP)
        tar.add(tmp_path / "rootfs", arcname="rootfs")
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"))
    done = stockade("images", "import", "--config", str(cfg), str(forged))
    assert done.returncode != 0
    assert "holds sandbox image 000000000000" in done.stderr
    assert not list((tmp_path / "lxc").iterdir())  # nothing half-installed is left


def test_serve_without_image_or_archive_says_how_to_get_one(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"),
                      image_archive_dir=str(tmp_path / "archives"), port=18099,
                      run_dir=str(tmp_path / "run"))
    done = stockade("serve", "--config", str(cfg))
    assert done.returncode == 2
    assert f"nor at {tmp_path}/archives/stockade-sandbox-" in done.stderr
    assert "make sandbox-image" in done.stderr


def fake_rootfs(tmp_path: Path, init: bool = True) -> Path:
    """A rootfs tarball with this code's sandbox sources (and catatonit, unless not)."""
    site = tmp_path / "rootfs" / images.SITE.format(version="3.11") / "stockade"
    (tmp_path / "rootfs/usr/bin").mkdir(parents=True)
    (tmp_path / "rootfs/usr/bin/python3").symlink_to("python3.11")
    if init:
        (tmp_path / "rootfs/usr/bin/catatonit").write_bytes(b"")
    source = images.package_root()
    for path in images.package_files():  # the very files the digest is made of
        copy = site / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    return site


def import_rootfs(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tarball = tmp_path / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "rootfs", arcname="./rootfs")
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"))
    return stockade("images", "import-rootfs", "--config", str(cfg), str(tarball))


def test_import_rootfs_refuses_a_rootfs_with_other_sandbox_code(tmp_path: Path) -> None:
    """The image is named by this code's digest, so its rootfs must carry this code."""
    site = fake_rootfs(tmp_path)
    (site / "sandbox" / "seccomp.py").write_text("ALLOW_EVERYTHING = True\n")
    done = import_rootfs(tmp_path)
    assert done.returncode != 0
    assert "sandbox/seccomp.py is not this stockade's seccomp.py" in done.stderr
    assert not list((tmp_path / "lxc").iterdir())


def test_import_rootfs_refuses_a_rootfs_without_the_runs_init(tmp_path: Path) -> None:
    fake_rootfs(tmp_path, init=False)
    done = import_rootfs(tmp_path)
    assert done.returncode != 0
    assert "has no /usr/bin/catatonit, every run's init" in done.stderr
    assert not list((tmp_path / "lxc").iterdir())


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Beside the real pool's: LXC needs every parent of an unprivileged container's
    rootfs traversable by the container's root, which pytest's 0700 tmp dirs are not."""
    path = Path(f"/var/lib/stockade/test-import-{os.getpid()}")
    path.mkdir(mode=0o711, parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_runner_imports_its_image_from_the_archive_dir_at_start(archive: Path,
                                                               state_dir: Path) -> None:
    archives = state_dir / "archives"
    archives.mkdir(mode=0o700)
    shutil.copyfile(archive, archives / archive.name)
    config = runner_config(18097, "stockade-ti-", pool_size=1, lean_pool_size=1,
                           lxc_path=str(state_dir / "lxc"), image_archive_dir=str(archives))
    runner = RunnerProcess(config)
    runner.start()
    try:
        result = runner.run("print(6 * 7)")
        assert (result.status, result.stdout) == ("ok", "42\n")
        assert "importing sandbox image from" in runner.log()
        assert images.is_current(config)
    finally:
        runner.stop()
        runner.close()
    assert runner_leftovers(config) == []


def test_remove_tree_never_removes_through_a_mount(tmp_path: Path) -> None:
    """A bind mount of the same filesystem looks like a plain directory to
    os.path.ismount; a container's view of the image is one, and must never be emptied."""
    precious = tmp_path / "image"
    precious.mkdir()
    (precious / "usr").write_text("keep")
    top = tmp_path / "container"
    (top / "view").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(precious), str(top / "view")], check=True)
    try:
        assert not os.path.ismount(top / "view")  # what made this guard necessary
        assert images.mounts_under(top) == [str(top / "view")]
        with pytest.raises(images.ImageError, match="is mounted there"):
            images.remove_tree(top)
        assert (precious / "usr").read_text() == "keep"
    finally:
        subprocess.run(["umount", str(top / "view")], check=True)
    images.remove_tree(top)
    assert not top.exists() and (precious / "usr").read_text() == "keep"


def test_prune_keeps_an_image_a_container_was_cloned_from(tmp_path: Path) -> None:
    config = RunnerConfig(lxc_path=str(tmp_path))
    for old in ("stockade-sandbox-0000000000aa", "stockade-sandbox-0000000000bb"):
        (tmp_path / old).mkdir()
        (tmp_path / old / images.STAMP).write_text("{}")
    clone = tmp_path / "stockade-pool-full-00001"
    clone.mkdir()
    (clone / "lxc_rdepends").write_text(f"{tmp_path}\nstockade-sandbox-0000000000aa\n")
    assert images.prune(config) == ["stockade-sandbox-0000000000bb"]
    assert (tmp_path / "stockade-sandbox-0000000000aa").is_dir()
