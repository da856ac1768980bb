"""`stockade doctor`: every check passes on a host `make packages` set up, and each one
fails with its fix when what it checks is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stockade import doctor
from stockade.runner.config import RunnerConfig
from stockade.runner.manager.apparmor import PROFILE

BIN = Path(sys.executable).parent
V1 = ("30 1 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
      "31 1 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n")
V2 = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def doctor_cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path or f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "stockade", "doctor", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_this_host_passes_every_check() -> None:
    done = doctor_cli("--listen", f"127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stdout
    assert "FAIL" not in done.stdout and "checks passed" in done.stdout


def test_missing_template_tools_fail_with_the_package_to_install(tmp_path: Path) -> None:
    """LXC's debian template needs rsync and debian-distro-info, which a new machine lacks."""
    for program in ("lxc-start", "newuidmap", "catatonit", "packer", "debootstrap",
                    "ansible-playbook"):
        found = shutil.which(program, path=f"{BIN}:{os.environ['PATH']}")
        assert found, program
        (tmp_path / program).symlink_to(found)
    done = doctor_cli("--listen", f"127.0.0.1:{free_port()}", path=str(tmp_path))
    assert done.returncode == 1
    assert "FAIL  rsync: not found" in done.stdout
    assert "apt-get install rsync" in done.stdout
    assert "FAIL  debian-distro-info: not found" in done.stdout
    assert "apt-get install distro-info" in done.stdout
    assert done.stdout.count("FAIL") == 2, done.stdout


def test_serve_only_skips_the_build_tools(tmp_path: Path) -> None:
    done = doctor_cli("--serve-only", "--listen", f"127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stdout
    assert "packer" not in done.stdout and "rsync" not in done.stdout


def test_a_taken_address_fails() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check = doctor.check_listen(RunnerConfig(port=port))
    assert not check.ok and "LISTEN=" in check.fix


@pytest.mark.parametrize(("mountinfo", "controllers", "ok", "words"), [
    (V1 + "32 1 0:28 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n", "", True,
     "v1: memory, pids and cpuacct"),
    (V1, "", False, "missing cpuacct"),
    (V2, "cpuset cpu io memory pids", True, "v2: memory, pids and cpu"),
    (V2, "cpu io", False, "missing memory, pids"),
    ("", "", False, "no cgroup"),
])
def test_cgroups(tmp_path: Path, mountinfo: str, controllers: str, ok: bool,
                 words: str) -> None:
    (tmp_path / "cgroup.controllers").write_text(controllers)
    check = doctor.check_cgroups(mountinfo, tmp_path)
    assert check.ok is ok and words in check.detail


def test_subordinate_ids(tmp_path: Path) -> None:
    config = RunnerConfig(pool_size=2, lean_pool_size=2, idmap_ranges=8,  # 8 x 65536 ids
                          environments={})
    span = "100000-624287"
    assert doctor.check_subids(config, tmp_path).ok  # none yet: serve adds them
    for name in ("subuid", "subgid"):
        (tmp_path / name).write_text("root:100000:65536\n")  # one range: not enough
    check = doctor.check_subids(config, tmp_path)
    assert check.ok and f"root has no {span} range yet" in check.detail
    for name in ("subuid", "subgid"):
        (tmp_path / name).write_text("root:100000:67108864\n")  # the lxc_host role's span
    assert f"root has {span}" in doctor.check_subids(config, tmp_path).detail
    (tmp_path / "subgid").write_text("alice:520000:65536\n")
    check = doctor.check_subids(config, tmp_path)
    assert not check.ok and "alice" in check.detail
    (tmp_path / "subuid").unlink()  # root has no range yet, and another user overlaps
    check = doctor.check_subids(config, tmp_path)
    assert not check.ok and f"/etc/subgid gives {span} to alice" in check.detail


def test_apparmor(tmp_path: Path) -> None:
    enabled, profiles = tmp_path / "enabled", tmp_path / "profiles"
    assert doctor.check_apparmor(enabled, profiles).ok  # not in this kernel
    enabled.write_text("Y\n")
    profiles.write_text("lxc-container-default (enforce)\n")
    check = doctor.check_apparmor(enabled, profiles)
    assert not check.ok and "make apparmor" in check.fix
    profiles.write_text(f"{PROFILE} (enforce)\n")
    assert doctor.check_apparmor(enabled, profiles).ok


def test_user_namespaces_and_overlay(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "user/max_user_namespaces").write_text("0\n")
    assert not doctor.check_user_namespaces(tmp_path).ok
    (tmp_path / "filesystems").write_text("nodev\tproc\nnodev\toverlay\n")
    assert doctor.check_overlayfs(tmp_path / "filesystems").ok


def test_packer_version_is_parsed() -> None:
    assert doctor.parse_packer_version("Packer v1.6.6\n") == (1, 6, 6)
    assert doctor.parse_packer_version("nothing") is None


def test_each_failure_prints_its_fix() -> None:
    line = doctor.Check("rsync", False, "not found", "apt-get install rsync").line()
    assert line.startswith("FAIL  rsync: not found") and "fix: apt-get install rsync" in line


def test_the_venvs_own_entry_point_finds_the_venvs_tools() -> None:
    """`.venv/bin/stockade doctor`, as the docs suggest, with no venv on PATH: the build's
    ansible-playbook is the venv's own."""
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p) != BIN)
    assert shutil.which("ansible-playbook", path=path) is None, "the test needs no other"
    done = subprocess.run([str(BIN / "stockade"), "doctor", "--listen",
                           f"127.0.0.1:{free_port()}"], env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout
    assert f"ok    ansible-playbook: {BIN}/ansible-playbook" in done.stdout


def test_idmapped_mounts_are_tried_for_real() -> None:
    """An idmapped view of a directory under an overlay, on lxc_path's filesystem, as a
    container past the first uid range gets its image; nothing of the try is left."""
    config = RunnerConfig()
    before = Path("/proc/self/mountinfo").read_text()
    check = doctor.check_idmapped_mounts(config)
    assert check.ok, check.line()
    assert f"as {config.idmap_base + config.idmap_size}" in check.detail
    assert Path("/proc/self/mountinfo").read_text().count("stockade-doctor") == \
        before.count("stockade-doctor") == 0
    where = Path(config.lxc_path)
    while not where.exists():
        where = where.parent
    assert list(where.glob(".stockade-doctor-*")) == []


def test_a_kernel_without_idmapped_mounts_is_named_with_the_fix() -> None:
    check = doctor.check_idmapped_mounts(RunnerConfig(), release="5.15.0-91-generic")
    assert not check.ok
    assert "Linux 5.15.0-91-generic has none" in check.detail
    assert "Linux 5.19 or later" in check.line()
