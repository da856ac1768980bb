"""Environments' sandbox images: what `images export` writes, `images import` turns back
into the same image on another host path; an archive of other sandbox code is refused;
`import-rootfs` refuses a rootfs that does not carry this code, its environment's Python or
exactly its lock's packages; a runner imports its images from its archive directory at
start and refuses to start without one, or with only an image of another lock; `images
list` and `gc`. (The small python-3.13-base image is the one moved around.)"""

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

from stockade import environment
from stockade.runner.config import RunnerConfig
from stockade.runner.local import RunnerProcess, runner_config
from stockade.runner.manager import images
from support.leftovers import runner_leftovers

STOCKADE = [sys.executable, "-m", "stockade"]
BASE = environment.get("python-3.13-base")


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
    status = stockade("images", "status", "--environment", BASE.name)
    assert status.returncode == 0, f"{status.stdout}: run `make sandbox-image` first"
    out = tmp_path_factory.mktemp("export")
    done = stockade("images", "export", "--output", str(out), "--environment", BASE.name)
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
    assert images.is_current(target, BASE)
    assert listing(images.image_dir(target, BASE) / "rootfs") == \
        listing(images.image_dir(source, BASE) / "rootfs")
    # The host config is written for the importing host's own paths.
    assert f"dir:{images.image_dir(target, BASE)}/rootfs" in (
        images.image_dir(target, BASE) / "config").read_text()
    again = stockade("images", "import", "--config", str(cfg), str(archive))
    assert again.returncode == 0 and "is current" in again.stdout, again.stderr


@pytest.mark.parametrize("env", environment.names())
def test_image_holds_no_set_id_file_and_exactly_its_lock(env: str) -> None:
    """Nothing in a container gains privileges by exec, and RestrictSUIDSGID hosts can
    import the image; what it installed is its lock, no more, no less."""
    config, definition = RunnerConfig(), environment.get(env)
    assert images.is_current(config, definition), "run `make sandbox-image` first"
    rootfs = images.image_dir(config, definition) / "rootfs"
    found = subprocess.run(["find", str(rootfs), "-xdev", "-perm", "/6000"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == []
    site = rootfs / images.SITE.format(version=definition.definition.python)
    assert images.installed_distributions(site) == {
        (p.name, p.version) for p in definition.pins()}
    assert not (site / "pip").exists()  # the installer ran from its wheel


def test_import_refuses_an_archive_of_other_sandbox_code(tmp_path: Path) -> None:
    (tmp_path / images.STAMP).write_text(json.dumps({
        "digest": "0" * 64, "built_at": 0, "python": "3.13", "packages": []}))
    (tmp_path / "rootfs" / "usr").mkdir(parents=True)
    forged = tmp_path / f"stockade-sandbox-{BASE.name}-000000000000.tar.gz"
    with tarfile.open(forged, "w:gz") as tar:
        tar.add(tmp_path / images.STAMP, arcname=images.STAMP)
        tar.add(tmp_path / "rootfs", arcname="rootfs")
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"))
    done = stockade("images", "import", "--config", str(cfg), str(forged))
    assert done.returncode != 0
    assert f"holds image 000000000000 of environment {BASE.name}" in done.stderr
    assert not list((tmp_path / "lxc").iterdir())  # nothing half-installed is left
    renamed = forged.rename(tmp_path / "stockade-sandbox-cobol-000000000000.tar.gz")
    done = stockade("images", "import", "--config", str(cfg), str(renamed))
    assert done.returncode != 0 and "of an environment this stockade defines" in done.stderr


def test_serve_without_image_or_archive_says_how_to_get_one(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"),
                      image_archive_dir=str(tmp_path / "archives"), port=18099,
                      run_dir=str(tmp_path / "run"))
    done = stockade("serve", "--config", str(cfg))
    assert done.returncode == 2
    assert f"at {tmp_path}/archives/stockade-sandbox-python-3.11-" in done.stderr
    assert "make sandbox-image" in done.stderr


def test_serve_refuses_an_image_of_another_lock_and_says_how_to_build(tmp_path: Path) -> None:
    """A new lock names a new image: the old one stays beside it, and is never served."""
    lxc = tmp_path / "lxc"
    old = lxc / f"stockade-sandbox-{BASE.name}-000000000000"
    other = lxc / f"stockade-sandbox-{BASE.name}-extra-000000000000"  # not BASE's
    for image in (old, other):
        (image / "rootfs" / "usr").mkdir(parents=True)
        (image / images.STAMP).write_text(json.dumps({
            "digest": "0" * 64, "built_at": 0, "python": "3.13.5", "packages": [],
            "environment": BASE.name}))
    cfg = config_file(tmp_path, lxc_path=str(lxc), image_archive_dir=str(tmp_path / "none"),
                      port=18099, run_dir=str(tmp_path / "run"),
                      default_environment=BASE.name, environments={})
    done = stockade("serve", "--config", str(cfg))
    assert done.returncode == 2
    assert f"this host has {old.name}, built from another lock or sandbox code" in done.stderr
    assert f"make environment ENV={BASE.name}" in done.stderr
    assert images.image_name(RunnerConfig(), BASE) in done.stderr


def fake_rootfs(tmp_path: Path, init: bool = True, python: str = "3.13") -> Path:
    """A rootfs tarball with this code's sandbox sources and the base environment's lock
    (and catatonit, unless not)."""
    site = tmp_path / "rootfs" / images.SITE.format(version=python)
    (tmp_path / "rootfs/usr/bin").mkdir(parents=True)
    (tmp_path / "rootfs/usr/bin/python3").symlink_to(f"python{python}")
    if init:
        (tmp_path / "rootfs/usr/bin/catatonit").write_bytes(b"")
    source = images.package_root()
    for path in images.package_files():  # the very files the digest is made of
        copy = site / "stockade" / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    for pin in BASE.pins():
        (site / f"{pin.name.replace('-', '_')}-{pin.version}.dist-info").mkdir()
    return site


def import_rootfs(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tarball = tmp_path / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "rootfs", arcname="./rootfs")
    cfg = config_file(tmp_path, lxc_path=str(tmp_path / "lxc"))
    return stockade("images", "import-rootfs", "--config", str(cfg), "--environment",
                    BASE.name, str(tarball))


def test_import_rootfs_refuses_packages_other_than_the_lock(tmp_path: Path) -> None:
    site = fake_rootfs(tmp_path)
    (site / "requests-2.0.0.dist-info").mkdir()
    done = import_rootfs(tmp_path)
    assert done.returncode != 0
    assert (f"packages are not environment {BASE.name}'s lock (not locked: "
            "requests==2.0.0; missing: none)") in done.stderr
    assert not list((tmp_path / "lxc").iterdir())


def test_import_rootfs_refuses_another_python(tmp_path: Path) -> None:
    fake_rootfs(tmp_path, python="3.11")
    done = import_rootfs(tmp_path)
    assert done.returncode != 0
    assert f"runs python 3.11, but environment {BASE.name} is python 3.13" in done.stderr


def test_import_rootfs_refuses_a_rootfs_with_other_sandbox_code(tmp_path: Path) -> None:
    """The image is named by this code's digest, so its rootfs must carry this code."""
    site = fake_rootfs(tmp_path) / "stockade"
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
                           default_environment=BASE.name, lxc_path=str(state_dir / "lxc"),
                           image_archive_dir=str(archives))
    runner = RunnerProcess(config)
    runner.start()
    try:
        result = runner.run("import sys; print(sys.version_info[:2])")
        assert (result.status, result.stdout) == ("ok", "(3, 13)\n")
        assert f"importing the {BASE.name} image from" in runner.log()
        assert images.is_current(config, BASE)
        listed = stockade("images", "list", "--json", "--config", str(
            config_file(state_dir, lxc_path=config.lxc_path)))
        [image] = json.loads(listed.stdout)
        assert image["name"] == images.image_name(config, BASE)
        assert (image["environment"], image["current"], image["in_use"]) == (
            BASE.name, True, True)
        assert image["python"].startswith("3.13.") and 50 < image["size_mib"] < 1000
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


def test_gc_keeps_current_images_and_those_a_container_was_cloned_from(
        tmp_path: Path) -> None:
    config = RunnerConfig(lxc_path=str(tmp_path))
    current = images.image_name(config, BASE)
    for name in ("stockade-sandbox-0000000000aa", "stockade-sandbox-python-3.13-0000000000bb",
                 current):
        (tmp_path / name).mkdir()
        (tmp_path / name / images.STAMP).write_text("{}")
    clone = tmp_path / "stockade-pool-full-00001"
    clone.mkdir()
    (clone / "lxc_rdepends").write_text(f"{tmp_path}\nstockade-sandbox-0000000000aa\n")
    done = stockade("images", "gc", "--config", str(config_file(clone, lxc_path=str(tmp_path))))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stockade: removed stockade-sandbox-python-3.13-0000000000bb\n"
    assert (tmp_path / "stockade-sandbox-0000000000aa").is_dir()
    assert (tmp_path / current).is_dir()
