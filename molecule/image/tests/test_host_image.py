"""The booted host image itself: its stamp matches the manifest `make image` wrote, it boots
its own kernel from its own disk, first boot gave it its own identity, and it carries no
build leftovers. Run by `make image-test` against the VM (molecule/image/boot_and_test.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import testinfra.host

from conftest import parse_release


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    path = os.environ.get("STOCKADE_IMAGE_MANIFEST")
    if not path:
        raise pytest.UsageError("run these tests through `make image-test` "
                                "(no STOCKADE_IMAGE_MANIFEST)")
    result: dict[str, Any] = json.loads(Path(path).read_text())
    return result


@pytest.fixture(scope="module")
def release(host: testinfra.host.Host) -> dict[str, str]:
    return parse_release(host.file("/etc/stockade-release").content_string)


def build_time(manifest: dict[str, Any]) -> float:
    return datetime.strptime(manifest["build_time"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC).timestamp()


def test_stamp_names_the_build_in_the_manifest(release: dict[str, str],
                                               manifest: dict[str, Any]) -> None:
    assert release["STOCKADE_VERSION"] == manifest["version"]
    assert release["STOCKADE_COMMIT"] == manifest["commit"]
    assert release["STOCKADE_BUILD_TIME"] == manifest["build_time"]


def test_manifest_sums_the_stamp_the_vm_carries(host: testinfra.host.Host,
                                                manifest: dict[str, Any]) -> None:
    content = host.file("/etc/stockade-release").content
    assert hashlib.sha256(content).hexdigest() == \
        manifest["files"]["stockade-release"]["sha256"]


def test_boots_its_own_root_by_uuid_without_outside_arguments(
        host: testinfra.host.Host) -> None:
    cmdline = host.file("/proc/cmdline").content_string
    match = re.search(r"\broot=UUID=([0-9a-f-]{36})\b", cmdline)
    assert match, cmdline
    assert "BOOT_IMAGE=/boot/vmlinuz-" in cmdline  # GRUB from the disk, not qemu's -kernel
    root = host.check_output("findmnt --noheadings --output UUID /")
    assert root == match.group(1)
    assert f"UUID={root} / ext4" in host.file("/etc/fstab").content_string


def test_first_boot_made_this_host_s_ssh_keys(host: testinfra.host.Host,
                                              manifest: dict[str, Any]) -> None:
    unit = host.service("stockade-ssh-hostkeys")
    assert unit.is_enabled
    show = host.check_output("systemctl show -p ConditionResult -p Result "
                             "stockade-ssh-hostkeys")
    assert "ConditionResult=yes" in show and "Result=success" in show, show
    for kind in ("ed25519", "rsa"):
        key = host.file(f"/etc/ssh/ssh_host_{kind}_key")
        assert key.exists and key.mode == 0o600
        assert key.mtime.timestamp() > build_time(manifest), f"{kind} key is the build's"


def test_first_boot_made_this_host_s_machine_id(host: testinfra.host.Host,
                                                manifest: dict[str, Any]) -> None:
    machine_id = host.file("/etc/machine-id")
    assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id.content_string)
    assert machine_id.mtime.timestamp() > build_time(manifest)


def test_no_package_caches_were_shipped(host: testinfra.host.Host) -> None:
    assert host.run("ls /var/cache/apt/archives/*.deb").rc != 0
    assert host.run("ls /var/lib/apt/lists/*_Packages").rc != 0


def test_sandbox_containers_were_prebuilt_into_the_image(host: testinfra.host.Host,
                                                         release: dict[str, str]) -> None:
    names = release["STOCKADE_SANDBOX_IMAGES"].split(",")
    assert len(names) >= 2  # the environments the image's variables name
    for image in names:
        stamp = json.loads(host.file(
            f"/var/lib/stockade/containers/{image}/stockade-image.json").content_string)
        assert image == f"stockade-sandbox-{stamp['environment']}-{stamp['digest'][:12]}"
    journal = host.check_output("journalctl --unit stockade-runner --no-pager --output cat")
    assert " image from " not in journal  # each was there before the first start


def test_the_host_runs_the_unified_cgroup_hierarchy(host: testinfra.host.Host) -> None:
    """A booted Debian 12 host is cgroup v2: the runner's v2 path is what served the runs."""
    controllers = host.file("/sys/fs/cgroup/cgroup.controllers").content_string.split()
    assert {"memory", "pids", "cpu"} <= set(controllers)
