"""Kernel and network hardening: every value is in /etc/sysctl.d, and live where this host
may hold it (inside a container, only its own network namespace's keys)."""

from __future__ import annotations

import pytest
import testinfra.host

FILE = "/etc/sysctl.d/99-stockade-hardening.conf"
NETNS_PREFIXES = ("net.ipv4.", "net.ipv6.")

# (id, key, expected): the ids are the ones in roles/hardening/defaults/main.yml.
SYSCTL = [
    ("sysctl-unprivileged-userns-clone", "kernel.unprivileged_userns_clone", 0),
    ("sysctl-mmap-rnd-bits", "vm.mmap_rnd_bits", 32),
    ("sysctl-mmap-rnd-compat-bits", "vm.mmap_rnd_compat_bits", 16),
    ("sysctl-protected-hardlinks", "fs.protected_hardlinks", 1),
    ("sysctl-protected-symlinks", "fs.protected_symlinks", 1),
    ("sysctl-protected-fifos", "fs.protected_fifos", 2),
    ("sysctl-protected-regular", "fs.protected_regular", 2),
    ("sysctl-suid-dumpable", "fs.suid_dumpable", 0),
    ("sysctl-kptr-restrict", "kernel.kptr_restrict", 2),
    ("sysctl-dmesg-restrict", "kernel.dmesg_restrict", 1),
    ("sysctl-kexec-load-disabled", "kernel.kexec_load_disabled", 1),
    ("sysctl-sysrq", "kernel.sysrq", 0),
    ("sysctl-randomize-va-space", "kernel.randomize_va_space", 2),
    ("sysctl-unprivileged-bpf-disabled", "kernel.unprivileged_bpf_disabled", 1),
    ("sysctl-yama-ptrace-scope", "kernel.yama.ptrace_scope", 2),
    ("sysctl-perf-event-paranoid", "kernel.perf_event_paranoid", 3),
    ("sysctl-bpf-jit-harden", "net.core.bpf_jit_harden", 2),
    ("sysctl-tty-ldisc-autoload", "dev.tty.ldisc_autoload", 0),
    ("sysctl-unprivileged-userfaultfd", "vm.unprivileged_userfaultfd", 0),
    ("sysctl-mmap-min-addr", "vm.mmap_min_addr", 65536),
    ("sysctl-ip-forward", "net.ipv4.ip_forward", 0),
    ("sysctl-all-accept-redirects", "net.ipv4.conf.all.accept_redirects", 0),
    ("sysctl-default-accept-redirects", "net.ipv4.conf.default.accept_redirects", 0),
    ("sysctl-all-secure-redirects", "net.ipv4.conf.all.secure_redirects", 0),
    ("sysctl-default-secure-redirects", "net.ipv4.conf.default.secure_redirects", 0),
    ("sysctl-all-send-redirects", "net.ipv4.conf.all.send_redirects", 0),
    ("sysctl-default-send-redirects", "net.ipv4.conf.default.send_redirects", 0),
    ("sysctl-all-accept-source-route", "net.ipv4.conf.all.accept_source_route", 0),
    ("sysctl-default-accept-source-route", "net.ipv4.conf.default.accept_source_route", 0),
    ("sysctl-all-rp-filter", "net.ipv4.conf.all.rp_filter", 1),
    ("sysctl-default-rp-filter", "net.ipv4.conf.default.rp_filter", 1),
    ("sysctl-all-log-martians", "net.ipv4.conf.all.log_martians", 1),
    ("sysctl-default-log-martians", "net.ipv4.conf.default.log_martians", 1),
    ("sysctl-tcp-syncookies", "net.ipv4.tcp_syncookies", 1),
    ("sysctl-tcp-rfc1337", "net.ipv4.tcp_rfc1337", 1),
    ("sysctl-icmp-echo-ignore-broadcasts", "net.ipv4.icmp_echo_ignore_broadcasts", 1),
    ("sysctl-icmp-ignore-bogus-errors", "net.ipv4.icmp_ignore_bogus_error_responses", 1),
    ("sysctl-ipv6-all-accept-ra", "net.ipv6.conf.all.accept_ra", 0),
    ("sysctl-ipv6-default-accept-ra", "net.ipv6.conf.default.accept_ra", 0),
    ("sysctl-ipv6-all-accept-redirects", "net.ipv6.conf.all.accept_redirects", 0),
    ("sysctl-ipv6-default-accept-redirects", "net.ipv6.conf.default.accept_redirects", 0),
    ("sysctl-ipv6-all-accept-source-route", "net.ipv6.conf.all.accept_source_route", 0),
    ("sysctl-ipv6-default-accept-source-route", "net.ipv6.conf.default.accept_source_route", 0),
]
IDS = [row[0] for row in SYSCTL]


def in_container(host: testinfra.host.Host) -> bool:
    return host.run("systemd-detect-virt --container").rc == 0


@pytest.fixture(scope="module")
def written(host: testinfra.host.Host) -> dict[str, str]:
    values = {}
    for line in host.file(FILE).content_string.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[key.strip().removeprefix("-")] = value.strip()  # "-": where the kernel has it
    return values


@pytest.mark.parametrize(("check_id", "key", "expected"), SYSCTL, ids=IDS)
def test_value_is_in_sysctl_d(written: dict[str, str], check_id: str, key: str,
                              expected: int) -> None:
    """Applied at every boot: the file is what a booted host starts with."""
    assert written.get(key) == str(expected), f"{check_id}: {key} in {FILE}"


@pytest.mark.parametrize(("check_id", "key", "expected"), SYSCTL, ids=IDS)
def test_value_is_live(host: testinfra.host.Host, check_id: str, key: str,
                       expected: int) -> None:
    """The running kernel holds it, not only the file."""
    if in_container(host) and not key.startswith(NETNS_PREFIXES):
        pytest.skip(f"{check_id}: {key} is kernel-wide, read-only in a container; "
                    "`make image-test` checks it live on a booted VM")
    assert host.sysctl(key) == expected, f"{check_id}: live {key}"


def test_no_file_in_sysctl_d_undoes_a_value(host: testinfra.host.Host) -> None:
    """A later file (sysctl.d applies in name order) must not override ours."""
    ours = {key for _, key, _ in SYSCTL}
    later = host.run("ls /etc/sysctl.d /usr/lib/sysctl.d").stdout.split()
    for name in sorted(n for n in later if n.endswith(".conf") and n > FILE.rsplit("/", 1)[-1]):
        for directory in ("/etc/sysctl.d", "/usr/lib/sysctl.d"):
            path = host.file(f"{directory}/{name}")
            if path.exists:
                keys = {line.split("=")[0].strip() for line in
                        path.content_string.splitlines() if "=" in line}
                assert not keys & ours, f"{path.path} sets {keys & ours} after us"


def test_only_root_may_create_a_user_namespace(host: testinfra.host.Host) -> None:
    """Behaviour of kernel.unprivileged_userns_clone=0: an ordinary user's unshare -U is
    refused; root's (LXC starting the pool) still works."""
    if in_container(host):
        pytest.skip("user namespaces are the host kernel's, not a container's to set; "
                    "`make image-test` checks this on a booted VM")
    refused = host.run("runuser -u nobody -- unshare --user true")
    assert refused.rc != 0 and "Operation not permitted" in refused.stderr, refused.stderr
    assert host.run("unshare --user true").rc == 0
