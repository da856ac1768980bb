"""/dev/shm can hold no set-id program, device or executable (id: shm-noexec)."""

from __future__ import annotations

import testinfra.host


def test_dev_shm_is_mounted_nosuid_nodev_noexec(host: testinfra.host.Host) -> None:
    options = host.check_output("findmnt --noheadings --output OPTIONS /dev/shm").split(",")
    assert {"nosuid", "nodev", "noexec"} <= set(options)


def test_a_program_copied_to_dev_shm_does_not_run(host: testinfra.host.Host) -> None:
    """Behaviour, not only the mount flags."""
    host.check_output("cp /bin/true /dev/shm/stockade-noexec && chmod 755 /dev/shm/stockade-noexec")
    try:
        ran = host.run("/dev/shm/stockade-noexec")
        assert ran.rc == 126 and "Permission denied" in ran.stderr
    finally:
        host.run("rm -f /dev/shm/stockade-noexec")


def test_fstab_keeps_it_at_boot(host: testinfra.host.Host) -> None:
    line = host.check_output("findmnt --fstab --noheadings --output OPTIONS /dev/shm")
    assert {"nosuid", "nodev", "noexec"} <= set(line.split(","))
