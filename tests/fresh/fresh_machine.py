#!/usr/bin/env python3
"""`make fresh-test`: the README's set-up command on a pristine Debian 12 system.

A new privileged system container (debootstrap through LXC's debian template, systemd as
init, nested so the runner inside can start its own unprivileged containers, on lxcbr0)
holds Debian's minimal base plus the README's prerequisites (make, git, curl) and nothing
else: no LXC, no template cache, no venv. It gets this machine's apt and pip configuration
(sources, CA bundle, pip config files and the local wheel directories they name, read-only)
so that the package registries are reached as they are here, and a clean clone of HEAD.
Then it runs the README's set-up command exactly, in the background, and passes only when
/readyz answers, a hello-world run and a pandas run are `ok` through the API and through
the README's `stockade run`, every environment the set-up built answers with its own Python,
and `make uninstall` then leaves nothing behind.

Standard library only: it runs before any venv exists. Everything it makes (the container,
its cgroups, LXC's cache for it, the bridge if it started it) is removed on every path; its
logs stay in build/fresh/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "fresh"
NAME = f"stockade-fresh-{os.getpid()}"
LXC_PATH = WORK / "lxc"
ROOTFS = LXC_PATH / NAME / "rootfs"
CHECKOUT = "/root/stockade"  # where a root user clones it: a mode-0700 home included
PREREQUISITES = "make,git,curl"  # what the README asks a new machine to have
SETUP_TIMEOUT_S = 40 * 60
HEARTBEAT_S = 30
URL = "http://127.0.0.1:8080"
VENDORED = "src/stockade/runner/front/static/vendor"  # the pages' libraries, fetched
PIP_CONFIGS = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"),
               Path("/root/.config/pip/pip.conf"), Path("/root/.pip/pip.conf")]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
NESTING = """
# fresh-test: nested like a stockade host (the rolling fleet's recipe)
lxc.include = /usr/share/lxc/config/nesting.conf
lxc.mount.auto =
lxc.mount.auto = proc:mixed sys:mixed cgroup:rw:force
"""
# Written into images/ once the set-up's archives are there (or the test gave up on them).
ARCHIVES_KEPT = REPO / "images" / ".fresh-test-archives"
HELLO = 'print("hello from a fresh machine")'
PANDAS = 'import pandas as pd\nprint(pd.DataFrame({"a": [1, 2, 3]})["a"].sum())'


class FreshTestError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"fresh-test: {message}", flush=True)


def sh(*command: str, check: bool = True, env: dict[str, str] | None = None,
       timeout: float = 600, label: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=env, timeout=timeout)
    with (WORK / "host.log").open("a") as log:
        log.write(f"$ {shlex.join(command)}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n")
    if check and done.returncode != 0:
        raise FreshTestError(f"{label or shlex.join(command)} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done


def guest_env() -> list[str]:
    """This machine's pip and CA settings, as a user's login would carry them."""
    values = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key in CA_VARIABLES:
            values[key] = value
    return [f"{key}={value}" for key, value in values.items()]


def attach(script: str, check: bool = True,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = ["lxc-attach", "-P", str(LXC_PATH), "-n", NAME, "--clear-env"]
    for pair in guest_env():
        command += ["--set-var", pair]
    return sh(*command, "--", "bash", "-c", script, check=check, timeout=timeout,
              label=f"in the container: {script}")


def readme_setup_command() -> str:
    """The fenced block right after the README's `fresh-test: set-up` marker."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- fresh-test: set-up -->\s*```\w*\n(.*?)```", text, re.DOTALL)
    if not found:
        raise FreshTestError("README.md has no set-up block after <!-- fresh-test: set-up -->")
    lines = [line.split("#", 1)[0].strip() for line in found.group(1).splitlines()]
    return " && ".join(line for line in lines if line)


# --- the host side: bridge, container, configuration ------------------------------------

@contextlib.contextmanager
def bridge() -> Iterator[None]:
    """lxcbr0 for the container's way to the registries; stopped again if we started it."""
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    started = "started" in sh(str(REPO / "molecule/shared/lxc-net-up")).stdout
    try:
        yield
    finally:
        if started:
            sh("/usr/libexec/lxc/lxc-net", "stop", check=False)
            Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


def local_pip_paths() -> list[Path]:
    """Files and directories this machine's pip configuration names (wheels, indexes)."""
    texts = [path.read_text() for path in PIP_CONFIGS if path.is_file()]
    texts += [value for key, value in os.environ.items() if key.startswith("PIP_")]
    found = {Path(match) for text in texts
             for match in re.findall(r"(?:file://)?(/[^\s'\"]+)", text)}
    # An index URL names its `simple` directory: bind the whole tree.
    return sorted({p.parent if p.name == "simple" else p for p in found if p.exists()})


def create_container() -> None:
    config = WORK / "container.conf"
    config.write_text("lxc.net.0.type = veth\nlxc.net.0.link = lxcbr0\nlxc.net.0.flags = up\n")
    env = {**os.environ, "LXC_CACHE_PATH": str(WORK / "cache")}
    sh("lxc-create", "-P", str(LXC_PATH), "-n", NAME, "-f", str(config), "-t", "debian",
       "--", "-r", "bookworm", f"--packages={PREREQUISITES}", env=env, timeout=900)
    lines = [NESTING]
    for path in local_pip_paths():
        if path.is_dir():
            lines.append(f"lxc.mount.entry = {path} {str(path).lstrip('/')} none "
                         "bind,ro,create=dir 0 0\n")
    with (LXC_PATH / NAME / "config").open("a") as out:
        out.writelines(lines)


def copy_into_rootfs(source: Path) -> None:
    target = ROOTFS / source.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


def configure_like_this_machine() -> None:
    """apt's sources and settings, the CA bundle, pip's configuration."""
    (ROOTFS / "etc/apt/sources.list").unlink(missing_ok=True)
    for path in ("/etc/apt/sources.list", "/etc/apt/sources.list.d", "/etc/apt/apt.conf.d",
                 "/etc/apt/trusted.gpg.d", "/etc/apt/preferences.d", "/usr/share/keyrings",
                 "/usr/local/share/ca-certificates", str(CA_BUNDLE)):
        if Path(path).exists():
            copy_into_rootfs(Path(path))
    for path in [*PIP_CONFIGS, *local_pip_paths()]:
        if path.is_file():
            copy_into_rootfs(path)


def clone_head() -> str:
    commit = sh("git", "-C", str(REPO), "rev-parse", "HEAD").stdout.strip()
    if sh("git", "-C", str(REPO), "status", "--porcelain", check=False).stdout.strip():
        say(f"the work tree has changes: testing the commit {commit[:12]}, not them")
    target = ROOTFS / CHECKOUT.lstrip("/")
    sh("git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target))
    sh("git", "-C", str(target), "checkout", "--quiet", "--detach", commit)
    return commit


def start_container() -> None:
    sh("lxc-start", "-P", str(LXC_PATH), "-n", NAME, "-d")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = attach("ip -4 -o addr show dev eth0 | grep -q inet && "
                      "ip -4 route show default | grep -q via", check=False)
        if done.returncode == 0:
            return
        time.sleep(2)
    raise FreshTestError("the fresh container got no address on lxcbr0 within 120 s")


def remove_container() -> None:
    if not (LXC_PATH / NAME).exists():
        return
    sh("lxc-stop", "-P", str(LXC_PATH), "-n", NAME, "--kill", check=False, timeout=120)
    sh("lxc-destroy", "-P", str(LXC_PATH), "-n", NAME, "--force", check=False, timeout=300)
    # The container's nested cgroups, the empty lxc.monitor one LXC leaves behind, and the
    # empty lxc.pivot one lxc-stop leaves in every v1 hierarchy (removed only if empty).
    hierarchies = [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").iterdir()]
    for hierarchy in hierarchies:
        for name in (f"lxc.payload.{NAME}", f"lxc.monitor.{NAME}", "lxc.pivot"):
            top = hierarchy / name
            if not top.is_dir():
                continue
            for inner in sorted(top.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    inner.rmdir()


# --- the guest side: the README's command, then the checks ------------------------------

def run_setup(command: str) -> None:
    say(f"running the README's set-up command in {CHECKOUT}: {command}")
    attach(f"cd {CHECKOUT} && setsid -f bash -c {shlex.quote(command)} "
           "</dev/null >/root/setup.log 2>&1")
    start = time.monotonic()
    beat = start + HEARTBEAT_S
    while time.monotonic() - start < SETUP_TIMEOUT_S:
        if attach(f"curl -fsS {URL}/readyz", check=False).returncode == 0:
            say(f"ready after {time.monotonic() - start:.0f} s")
            return
        # [m]: the pattern must not match this very shell's command line.
        if attach("pgrep -f '[m]ake run' >/dev/null", check=False).returncode != 0:
            raise FreshTestError("the set-up command ended before the runner was ready")
        if time.monotonic() >= beat:
            last = attach("tail -n 1 /root/setup.log", check=False).stdout.strip()[:100]
            say(f"... {time.monotonic() - start:.0f} s; last: {last}")
            beat += HEARTBEAT_S
        time.sleep(3)
    raise FreshTestError(f"the runner was not ready within {SETUP_TIMEOUT_S} s")


def post_run(code: str, environment: str | None = None) -> dict[str, object]:
    body = shlex.quote(json.dumps({"code": code, "environment": environment}))
    done = attach(f"curl -sS -H 'Content-Type: application/json' -d {body} {URL}/v1/runs")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def check_runs() -> None:
    for label, code, expected in (("hello", HELLO, "hello from a fresh machine\n"),
                                  ("pandas", PANDAS, "6\n")):
        record = post_run(code)
        if record.get("status") != "ok" or record.get("stdout") != expected:
            raise FreshTestError(f"the {label} run is not ok: {record}")
        say(f"{label} run: ok in {record['wall_time_s']} s wall")
    done = attach(f"cd {CHECKOUT} && .venv/bin/stockade run examples/hello.py")
    say(f"stockade run examples/hello.py: {done.stdout.strip()!r}")
    check_environments()
    check_stream()


def check_environments() -> None:
    """Each environment the default config serves (Debian 12's Python and Debian 13's, built
    from their locks on this pristine machine) runs code in its own interpreter."""
    listing = json.loads(attach(f"curl -fsS {URL}/v1/environments").stdout)
    names = [env["name"] for env in listing["environments"]]
    if not {"python-3.11", "python-3.13"} <= set(names):
        raise FreshTestError(f"the default config serves {names}, not both Pythons")
    for env in listing["environments"]:
        record = post_run("import sys; print(sys.version.split()[0])", env["name"])
        if record.get("status") != "ok" or record.get("stdout") != env["version"] + "\n":
            raise FreshTestError(f"a run in {env['name']} is not ok: {record}")
        say(f"{env['name']}: Python {env['version']}, packages: "
            f"{', '.join(p['name'] for p in env['packages'])}: ok")


def check_stream() -> None:
    """A run's output as server-sent events, then its record; and `stockade run --stream`."""
    body = shlex.quote(json.dumps({"code": "print('one', flush=True)\nprint('two')"}))
    done = attach(f"curl -sSN -H 'Accept: text/event-stream' -d {body} {URL}/v1/runs")
    names = re.findall(r"^event: (\w+)$", done.stdout, re.MULTILINE)
    if names[-1:] != ["result"] or "stdout" not in names or '"status":"ok"' not in done.stdout:
        raise FreshTestError(f"the streamed run is not stdout events then a result: "
                             f"{done.stdout[:500]!r}")
    streamed = attach(f"cd {CHECKOUT} && .venv/bin/stockade run --stream examples/hello.py")
    if "hello, world" not in streamed.stdout:
        raise FreshTestError(f"stockade run --stream printed {streamed.stdout!r}")
    say(f"a streamed run: events {', '.join(names)}")


def check_session() -> None:
    """A session keeps its state, shows a table and a figure, and ends with its input."""
    script = shlex.quote("import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\n"
                         "int(df.a.sum())\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\n")
    done = attach(f"cd {CHECKOUT} && printf %s {script} | .venv/bin/stockade session "
                  "--out /root/session-out && head -c 4 /root/session-out/stockade-output-1.png"
                  " | od -c | head -1")
    if "3\n" not in done.stdout or "P   N   G" not in done.stdout:
        raise FreshTestError(f"stockade session did not keep its state or save its figure: "
                             f"{done.stdout[-500:]!r}")
    left = attach(f"curl -fsS {URL}/v1/sessions").stdout
    if json.loads(left) != {"sessions": []}:
        raise FreshTestError(f"the session outlived its input: {left}")
    say("a session: state kept between cells, a figure saved, ended with its input")


def check_python_client() -> None:
    """The README's Python example, as it is written, with the venv the set-up made."""
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    if example is None:
        raise FreshTestError("the README has no Python example")
    done = attach(f"cd {CHECKOUT} && .venv/bin/python -c {shlex.quote(example.group(1))}")
    if done.stdout.strip() != "3":
        raise FreshTestError(f"the README's Python example printed {done.stdout!r}")
    say("the README's Python client example: 3")


def check_pages() -> None:
    """The playground and the API docs, with the browser library fetched at set-up."""
    for path, words in (("/", "stockade playground"), ("/docs", "swagger-ui-bundle.js")):
        page = attach(f"curl -fsS {URL}{path}").stdout
        if words not in page:
            raise FreshTestError(f"{path} is not the page it should be: {page[:300]!r}")
    bundle = re.search(r'src="(/static/vendor/swagger-ui/swagger-ui-bundle\.js\?v=\w+)"',
                       attach(f"curl -fsS {URL}/docs").stdout)
    if bundle is None:
        raise FreshTestError("/docs links no Swagger UI bundle")
    size = attach(f"curl -fsS -o /dev/null -w '%{{size_download}}' {URL}{bundle.group(1)}")
    if int(size.stdout) < 100_000:
        raise FreshTestError(f"the Swagger UI bundle is {size.stdout} bytes")
    say("the playground and the API docs: served, Swagger UI vendored")


def keep_image_archives() -> None:
    """The environments' image archives the set-up built, into this checkout's images/:
    each is named by its digest, so `make sandbox-image` here imports one (checked against
    that digest) rather than build the same image again. A cache within a run: it never
    stands in for the set-up this test proves, which has run by now. Kept as soon as the
    set-up is ready, each under a temporary name then renamed, and ARCHIVES_KEPT last, so a
    CI lane waiting for them (tests/fresh/await-archives) never reads half a file."""
    built = ROOTFS / CHECKOUT.lstrip("/") / "images"
    (REPO / "images").mkdir(exist_ok=True)
    for archive in sorted(built.glob("stockade-sandbox-*.tar.gz")):
        part = REPO / "images" / f".{archive.name}.part"
        shutil.copyfile(archive, part)
        part.rename(REPO / "images" / archive.name)
        say(f"kept {archive.name} in images/ ({archive.stat().st_size >> 20} MiB)")
    ARCHIVES_KEPT.write_text(f"{os.getpid()}\n")


def check_uninstall() -> None:
    attach("pkill -INT -f '[s]tockade serve'; for i in $(seq 60); do "
           "pgrep -f '[s]tockade serve' >/dev/null || exit 0; sleep 1; done; exit 1", timeout=90)
    attach(f"cd {CHECKOUT} && make uninstall", timeout=300)
    left = attach("id stockade 2>/dev/null; grep -h '^root:100000:' /etc/subuid /etc/subgid; "
                  "ls -d /var/lib/stockade /run/stockade /etc/stockade 2>/dev/null; "
                  "lxc-ls -P /var/lib/stockade/containers 2>/dev/null; "
                  "ls -d /var/cache/lxc/debian/* /var/cache/lxc/debian/.made-by-* 2>/dev/null; "
                  f"ls -d {CHECKOUT}/.venv {CHECKOUT}/{VENDORED} 2>/dev/null; "
                  "true").stdout.strip()
    if left:
        raise FreshTestError(f"make uninstall left behind: {left}")
    say("make uninstall: nothing left behind")


def keep_logs() -> None:
    for name in ("setup.log",):
        source = ROOTFS / "root" / name
        if source.exists():
            shutil.copy(source, WORK / name)


def main() -> int:
    if os.geteuid() != 0:
        print("fresh-test: needs root (it creates a system container)", file=sys.stderr)
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ARCHIVES_KEPT.unlink(missing_ok=True)
    start = time.monotonic()
    command = readme_setup_command()
    try:
        with bridge():
            try:
                say(f"creating a pristine Debian 12 container {NAME} (~1-2 min)")
                create_container()
                configure_like_this_machine()
                say(f"cloned {clone_head()[:12]} to {CHECKOUT}")
                start_container()
                run_setup(command)
                keep_image_archives()
                check_runs()
                check_session()
                check_python_client()
                check_pages()
                check_uninstall()
            finally:
                (REPO / "images").mkdir(exist_ok=True)
                ARCHIVES_KEPT.write_text(f"{os.getpid()}\n")
                keep_logs()
                remove_container()
                shutil.rmtree(LXC_PATH, ignore_errors=True)
                shutil.rmtree(WORK / "cache", ignore_errors=True)
    except (FreshTestError, subprocess.TimeoutExpired) as exc:
        print(f"fresh-test: FAILED: {exc}", file=sys.stderr)
        setup_log = WORK / "setup.log"
        if setup_log.exists():
            tail = setup_log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(f"    | {line}" for line in tail), file=sys.stderr)
        print(f"fresh-test: logs: {setup_log} (the set-up), {WORK / 'host.log'} (each command "
              "run here); next: make fresh-test again, or read the set-up log", file=sys.stderr)
        return 1
    say(f"passed in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
