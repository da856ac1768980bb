"""AppArmor as the pool needs it: where the kernel enforces it, pool containers run under
stockade's own profile (roles/lxc_host/files/stockade-sandbox), since LXC's default one
forbids the mounts that build each run's private root. Reads only."""

from __future__ import annotations

from pathlib import Path

PROFILE = "stockade-sandbox"
ENABLED = Path("/sys/module/apparmor/parameters/enabled")
PROFILES = Path("/sys/kernel/security/apparmor/profiles")
HOW_TO_LOAD = (f"`make apparmor` in a checkout (the lxc_host role does it on a host); by hand, "
               f"copy roles/lxc_host/files/{PROFILE} to /etc/apparmor.d/ and run "
               f"apparmor_parser -r /etc/apparmor.d/{PROFILE}")


def enforced(enabled: Path = ENABLED) -> bool:
    try:
        return enabled.read_text().strip() == "Y"
    except OSError:
        return False


def loaded(profiles: Path = PROFILES) -> set[str]:
    """The names of the loaded profiles; OSError where securityfs cannot be read."""
    return {line.rsplit(" (", 1)[0] for line in profiles.read_text().splitlines()}
