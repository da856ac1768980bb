"""How the images are built on a new machine: the build container really gets its config
(netless), and a template that did not install what it was asked for stops the build at
once with the cause and the fix."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "packer/scripts/check-build-container"
TEMPLATES = [REPO / "packer/sandbox.pkr.hcl", REPO / "packer/host.pkr.hcl"]


def check(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK), *args], env={**os.environ, "ROOT": str(root)},
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "sys/class/net/lo").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    return tmp_path


def test_a_complete_netless_container_passes(rootfs: Path) -> None:
    (rootfs / "usr/bin/python3").write_text("")
    (rootfs / "usr/bin/python3").chmod(0o755)
    done = check(rootfs, "/usr/bin/python3", "--netless")
    assert done.returncode == 0, done.stderr


def test_a_template_that_skipped_its_packages_stops_the_build(rootfs: Path) -> None:
    done = check(rootfs, "/usr/bin/python3", "--netless")
    assert done.returncode == 1
    assert "/usr/bin/python3 is missing" in done.stderr
    assert "distro-info" in done.stderr and "fix: make packages" in done.stderr


def test_a_container_with_a_network_device_stops_the_build(rootfs: Path) -> None:
    (rootfs / "sys/class/net/eth0").mkdir()
    done = check(rootfs, "--netless")
    assert done.returncode == 1 and "network interfaces: eth0" in done.stderr


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_lxc_create_is_handed_the_build_config(template: Path) -> None:
    """Packer 1.6.6 never passes config_file to lxc-create: create_options must."""
    text = template.read_text()
    config = re.search(r'config_file\s*=\s*"\$\{path.root\}/([^"]+)"', text)
    assert config, "no config_file"
    assert re.search(r'create_options\s*=\s*\["-f",\s*"\$\{path.root\}/'
                     + re.escape(config.group(1)) + '"\\]', text), "no create_options -f"
    assert "lxc.net.0.type = empty" in (template.parent / config.group(1)).read_text()
    first = re.search(r'provisioner "(\w+)" \{(.*?)\n  \}', text, re.DOTALL)
    assert first and first.group(1) == "shell" and "check-build-container" in first.group(2)
    assert "--netless" in first.group(2)


def make_variable(name: str) -> list[str]:
    done = subprocess.run(["make", "-s", "-p", "-n", "-f", str(REPO / "Makefile"), "help"],
                          capture_output=True, text=True, check=True, cwd=REPO)
    found = re.search(rf"^{name} := (.*)$", done.stdout, re.MULTILINE)
    assert found, name
    return found.group(1).split()


def test_make_packages_brings_what_lxc_debian_template_needs() -> None:
    """--no-install-recommends brings neither rsync nor distro-info with lxc-templates."""
    serve = make_variable("SERVE_PACKAGES")
    for package in ("lxc", "lxc-templates", "debootstrap", "rsync", "distro-info", "packer"):
        assert package in serve, package


def test_serving_needs_no_test_kit() -> None:
    serve = make_variable("SERVE_PACKAGES")
    for package in ("qemu-system-x86", "qemu-utils", "nginx-light", "dnsmasq-base"):
        assert package not in serve, package
    assert "dev" not in make_variable("SERVE_EXTRAS")[0].split(",")
