"""sshd: keys only, no forwarding, modern algorithms; checked in the effective config
(`sshd -T`) and by logging in from the Molecule host."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import testinfra.host

from conftest import Instance

# (id, sshd -T key, expected value)
EFFECTIVE = [
    ("ssh-password-auth", "passwordauthentication", "no"),
    ("ssh-kbd-interactive", "kbdinteractiveauthentication", "no"),
    ("ssh-empty-passwords", "permitemptypasswords", "no"),
    ("ssh-root-login", "permitrootlogin", "without-password"),
    ("ssh-pubkey", "pubkeyauthentication", "yes"),
    ("ssh-rsa-size", "requiredrsasize", "3072"),
    ("ssh-pubkey-algorithms", "pubkeyacceptedalgorithms",
     "ssh-ed25519,sk-ssh-ed25519@openssh.com,rsa-sha2-512,rsa-sha2-256"),
    ("ssh-tcp-forwarding", "allowtcpforwarding", "no"),
    ("ssh-agent-forwarding", "allowagentforwarding", "no"),
    ("ssh-streamlocal-forwarding", "allowstreamlocalforwarding", "no"),
    ("ssh-x11-forwarding", "x11forwarding", "no"),
    ("ssh-tunnel", "permittunnel", "no"),
    ("ssh-gateway-ports", "gatewayports", "no"),
    ("ssh-user-environment", "permituserenvironment", "no"),
    ("ssh-max-auth-tries", "maxauthtries", "3"),
    ("ssh-login-grace-time", "logingracetime", "30"),
    ("ssh-log-level", "loglevel", "VERBOSE"),
    ("ssh-ciphers", "ciphers", "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
     "aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr"),
    ("ssh-macs", "macs", "hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,"
     "umac-128-etm@openssh.com"),
    ("ssh-kex", "kexalgorithms", "sntrup761x25519-sha512@openssh.com,curve25519-sha256,"
     "curve25519-sha256@libssh.org,diffie-hellman-group16-sha512,"
     "diffie-hellman-group18-sha512"),
]


@pytest.fixture(scope="module")
def effective(host: testinfra.host.Host) -> dict[str, str]:
    out = host.check_output("sshd -T")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.mark.parametrize(("check_id", "key", "expected"), EFFECTIVE,
                         ids=[row[0] for row in EFFECTIVE])
def test_effective_sshd_setting(effective: dict[str, str], check_id: str, key: str,
                                expected: str) -> None:
    assert effective[key] == expected, check_id


def test_sshd_runs_and_starts_at_boot(host: testinfra.host.Host) -> None:
    ssh = host.service("ssh")
    assert ssh.is_running and ssh.is_enabled


def test_key_login_works(instance: Instance) -> None:
    """The admin key gets in: the hardening does not lock the operator out."""
    done = instance.ssh("id -u")
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr


def test_password_login_is_not_even_offered(instance: Instance) -> None:
    done = instance.ssh("true", "-o", "PubkeyAuthentication=no",
                        "-o", "PreferredAuthentications=password,keyboard-interactive")
    assert done.returncode == 255
    assert "Permission denied (publickey)" in done.stderr


def test_weak_cipher_is_refused(instance: Instance) -> None:
    done = instance.ssh("true", "-o", "Ciphers=aes128-cbc", "-o", "LogLevel=INFO")
    assert done.returncode == 255 and "no matching cipher" in done.stderr


def test_port_forwarding_is_refused(instance: Instance) -> None:
    """Behaviour: a forward through the host (`ssh -W`) is refused by sshd."""
    done = instance.ssh("true", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO",
                        "-W", "127.0.0.1:22")
    assert done.returncode == 255
    assert "administratively prohibited" in done.stderr


def test_a_short_rsa_key_is_refused_even_when_authorized(host: testinfra.host.Host,
                                                         instance: Instance,
                                                         tmp_path: Path) -> None:
    """Behaviour: a 2048-bit RSA key in root's authorized_keys still does not get in."""
    key = tmp_path / "short_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-C",
                    "short-rsa-test", "-f", str(key)], check=True)
    line = key.with_suffix(".pub").read_text().strip()
    keys = "/root/.ssh/authorized_keys"
    host.run(f"echo '{line}' >> {keys}")
    try:
        done = instance.ssh("true", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=INFO",
                            key=key)
        assert done.returncode == 255 and "Permission denied" in done.stderr, done.stderr
    finally:
        host.run(f"sed -i '/short-rsa-test$/d' {keys}")
    assert "short-rsa-test" not in host.file(keys).content_string
