"""`make image-test`: boot the host image's qcow2 under qemu and run the host testinfra suite
against the running VM over ssh.

The artifact is never written: the VM boots a throwaway qcow2 overlay. qemu's user-mode
network forwards the guest's ssh and http ports to free ports on this host's loopback only.
The admin key reaches the guest as a systemd credential (`ssh.authorized_keys.root` over
fw_cfg), the way a provider's metadata would: the image itself carries no key. The tests
are the Molecule scenarios' own (hardening, runner) plus the image's (stamp, first boot),
less the few that need packets to reach the instance unproxied. The VM is shut down on
every path. On any failure the VM's serial console is kept in build/logs and its tail
printed, and the last lines say what failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MOLECULE = HERE.parent
sys.path.insert(0, str(MOLECULE))
from conftest import SSH_OPTIONS, free_port  # noqa: E402 - the tests' own ssh options, from their dir

SUITES = [MOLECULE / "hardening" / "tests", MOLECULE / "runner" / "tests", HERE / "tests"]
# The first is done at image build time, not at the runner's first start:
# tests/test_host_image.py checks the image's own version of it. The others do not fit a
# guest without KVM: importing scikit-learn (scipy's sparse, special, linalg and optimize)
# costs a run about 1 s of CPU natively and 20 s under TCG (measured), twice the 10 s a run
# may have. The Molecule runner scenario and pytest import it; here its environments still
# import scipy and pyarrow and answer with their Pythons.
DATA_IMPORTS = "runner/tests/test_image.py::test_data_package_imports_in_each_python_on_both_routes"
DESELECT = ["runner/tests/test_image.py::test_runner_imported_the_archived_images",
            *(f"{DATA_IMPORTS}[{python}-scikit-learn]" for python in ("3.11", "3.13"))]
CONSOLE_TAIL = 60
CONSOLE_KEPT = MOLECULE.parent / "build" / "logs" / "image-test-console.log"
GATEWAY = "10.0.2.2"  # qemu's user-mode network: where the guest sees this host


class ImageTestError(Exception):
    """The VM did not come up; the message says how far it got."""


def accel() -> str:
    """TCG unless asked: on these machines a Linux guest hangs under KVM (MACHINE-NOTES)."""
    wanted = os.environ.get("STOCKADE_QEMU_ACCEL", "tcg")
    if wanted not in {"tcg", "kvm"}:
        raise ImageTestError(f"STOCKADE_QEMU_ACCEL must be tcg or kvm, not {wanted!r}")
    return wanted


@contextlib.contextmanager
def vm(image: Path, work: Path, ports: dict[int, int], pubkey: Path, *,
       memory_mib: int, cpus: int) -> Iterator[subprocess.Popen[bytes]]:
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                    "-b", str(image.resolve()), str(overlay)], check=True)
    forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                        for guest, host in ports.items())
    argv = ["qemu-system-x86_64", "-accel", accel(), "-cpu", "max",
            "-m", str(memory_mib), "-smp", str(cpus),
            "-display", "none", "-serial", f"file:{work / 'console.log'}",
            "-monitor", "none", "-no-reboot",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-netdev", f"user,id=net0,{forwards}", "-device", "virtio-net-pci,netdev=net0",
            "-fw_cfg", f"name=opt/io.systemd.credentials/ssh.authorized_keys.root,file={pubkey}"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(work / "qemu.log").open("wb"))
    try:
        yield qemu
    finally:
        if qemu.poll() is None:
            qemu.terminate()
            try:
                qemu.wait(20)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()


def wait_for(what: str, check: Callable[[], bool], qemu: subprocess.Popen[bytes],
             timeout: float, every: float) -> float:
    """Poll `check()` until true; the seconds it took. Fails if qemu exits or time is up."""
    started = time.monotonic()
    while True:
        if qemu.poll() is not None:
            raise ImageTestError(f"qemu exited with {qemu.returncode} while waiting for {what}")
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ImageTestError(f"no {what} after {timeout:.0f} s")
        time.sleep(every)


def ssh_ok(key: Path, port: int) -> bool:
    try:
        return vm_ssh(key, port, "true").returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def vm_ssh(key: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", "/dev/null", *SSH_OPTIONS, "-i", str(key), "-p", str(port),
                           "root@127.0.0.1", command],
                          capture_output=True, text=True, timeout=30, check=False)


def shutdown(key: Path, port: int, qemu: subprocess.Popen[bytes]) -> None:
    """A clean poweroff if the guest still takes commands; `vm` kills qemu otherwise."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        if vm_ssh(key, port, "systemctl poweroff").returncode in {0, 255}:
            qemu.wait(120)


def print_console(work: Path) -> None:
    """The console's tail, and the whole of it kept where the step's log is."""
    text = (work / "console.log").read_text(errors="replace")
    CONSOLE_KEPT.parent.mkdir(parents=True, exist_ok=True)
    CONSOLE_KEPT.write_text(text)
    lines = text.splitlines()
    print(f"--- VM serial console (last {CONSOLE_TAIL} of {len(lines)} lines; "
          f"all of it: {CONSOLE_KEPT}) ---")
    print("\n".join(lines[-CONSOLE_TAIL:]))
    qemu_log = (work / "qemu.log").read_text(errors="replace").strip()
    if qemu_log:
        print(f"--- qemu ---\n{qemu_log}")


def run_tests(argv: list[str], env: dict[str, str]) -> list[str]:
    """Run pytest, streaming its output; its summary lines for what failed (empty: passed)."""
    failed: list[str] = []
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as tests:
        assert tests.stdout is not None
        for line in tests.stdout:
            print(line, end="", flush=True)
            if line.startswith(("FAILED ", "ERROR ")):
                failed.append(line.rstrip())
    if tests.returncode != 0 and not failed:
        failed.append(f"pytest exited with {tests.returncode}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-dir", type=Path, default=Path("images/host"),
                        help="what `make image` wrote (default images/host)")
    parser.add_argument("--boot-timeout", type=float, default=900,
                        help="seconds to wait for ssh, then for /readyz (default 900)")
    parser.add_argument("--memory-mib", type=int, default=4096)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    image = args.image_dir / "stockade-host.qcow2"
    if not image.is_file():
        print(f"image-test: {image} is missing: run `make image` first", file=sys.stderr)
        return 2
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            print(f"image-test: {tool} is missing: run `make test-packages`", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="stockade-image-test-"))
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "image-test",
                    "-f", str(key)], check=True)
    ports = {22: free_port(), 80: free_port()}
    passed = False
    try:
        with vm(image, work, ports, key.with_suffix(".pub"), memory_mib=args.memory_mib,
                cpus=args.cpus) as qemu:
            try:
                # Every 5 s: the guest's firewall allows 10 new ssh connections a minute
                # per source, and the tests make their own later.
                took = wait_for("ssh login", lambda: ssh_ok(key, ports[22]), qemu,
                                args.boot_timeout, every=5)
                print(f"image-test: ssh answered {took:.0f} s after boot ({accel()})")
                took = wait_for("/readyz through nginx", lambda: ready(ports[80]), qemu,
                                args.boot_timeout, every=2)
                print(f"image-test: runner ready {took:.0f} s later")
                # Every connection from here arrives from qemu's gateway: the ssh tests' own
                # refused logins must not get testinfra's address banned. (The ban itself
                # is the hardening scenario's test; it needs a real network path.)
                ignored = vm_ssh(key, ports[22],
                                 f"fail2ban-client set sshd addignoreip {GATEWAY}")
                if ignored.returncode != 0:
                    raise ImageTestError(f"fail2ban-client addignoreip: {ignored.stderr}")
            except ImageTestError as exc:
                print_console(work)
                print(f"image-test: {exc}")
                return 1
            config = work / "instances.yml"
            config.write_text(yaml.safe_dump([{
                "instance": "stockade-image-vm", "ip": "127.0.0.1", "identity_file": str(key),
                "backend": "ssh", "ports": ports}]))
            argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE",
                    "--rootdir", str(MOLECULE), "-m", "not direct_network",
                    *(f"--deselect={d}" for d in DESELECT),
                    *map(str, SUITES), *args.pytest_args]
            env = {**os.environ, "MOLECULE_INSTANCE_CONFIG": str(config),
                   "STOCKADE_IMAGE_MANIFEST": str((args.image_dir / "manifest.json").resolve())}
            failed = run_tests(argv, env)
            passed = not failed
            if failed:
                print_console(work)
                # Last, where a step's tail shows it: what failed, not the console's end.
                print("image-test: these failed (their output is above the console):")
                print("\n".join(f"  {line}" for line in failed))
            shutdown(key, ports[22], qemu)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"image-test: {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
