"""The sandbox image came from the archive the sandbox_images role put on the host, imported
by the runner at start: nothing was built or downloaded there."""

from __future__ import annotations

import json

import testinfra.host


def test_runner_imported_the_archived_image(host: testinfra.host.Host) -> None:
    archives = host.check_output("ls /var/lib/stockade/images").split()
    assert len(archives) == 1 and archives[0].startswith("stockade-sandbox-")
    image = archives[0].removesuffix(".tar.gz")
    stamp = json.loads(host.file(
        f"/var/lib/stockade/containers/{image}/stockade-image.json").content_string)
    assert image.endswith(stamp["digest"][:12])
    journal = host.check_output("journalctl --unit stockade-runner --no-pager --output cat")
    assert "importing sandbox image from /var/lib/stockade/images/" in journal
    assert "creating the sandbox rootfs" not in journal  # never built here


def test_archive_is_readable_by_root_only(host: testinfra.host.Host) -> None:
    directory = host.file("/var/lib/stockade/images")
    assert directory.user == "root" and directory.mode == 0o700
