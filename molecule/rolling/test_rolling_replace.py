"""Rolling replacement, end to end (`make roll-test`): a fleet of stockade hosts made from the
host image (`make image`) as nested LXC system containers on lxcbr0, behind an nginx load
balancer on this host's loopback, with clients sending runs throughout.

- A full rollout (ansible/rolling_replace.yml) replaces every host, and no client request
  fails. Each new host gets the fleet's key file and believes the balancer's
  X-Forwarded-For, so its nginx sees (and limits) the real client, not the balancer. A
  session kept busy through the rollout is served by its host until that host's drain
  gives up on it, then answers 410.
- A rollout of a deliberately broken image (its runner config does not parse) stops at the
  canary: the other hosts stay on the image they had and keep serving, and no client
  request fails.

The fleet starts on an "old" image: the new one with another commit in its stamp, so the
test can tell which image each host runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import free_port, parse_release

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
IMAGE = ROOT / "images" / "host" / "rootfs.tar.gz"
HOSTS = [f"stockade-roll-{i}" for i in (1, 2, 3)]
CLIENTS = 4
# Between a client's requests: steady load that leaves the 2 cores room to boot hosts.
THINK_S = 0.05
# Load bounds: the load runs only while a rollout does, and never past these.
MAX_LOAD_S, MAX_REQUESTS = 1200, 50_000
OLD_COMMIT = "0" * 40
SESSION_DRAIN_S = 10
READY_TIMEOUT_S = 120


def sh(*argv: str, timeout: float = 600) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def attach(host: str, *argv: str) -> str:
    return sh("lxc-attach", "-n", host, "--", *argv, timeout=60)


def stamp(host: str) -> dict[str, str]:
    return parse_release(attach(host, "cat", "/etc/stockade-release"))


def machine_id(host: str) -> str:
    return attach(host, "cat", "/etc/machine-id").strip()


def address(host: str) -> str:
    """The host's IPv4 address on the bridge."""
    return next(a for a in sh("lxc-info", "-n", host, "-iH").split() if "." in a)


def bridge_address() -> str:
    """This host's address on the bridge: where the balancer's requests come from."""
    return sh("ip", "-4", "-o", "addr", "show", "lxcbr0").split()[3].split("/")[0]


def make_key(work: Path) -> tuple[Path, str]:
    """The fleet's key file, made as an operator makes it, and its one key: with room for
    the whole load on one host (a key's default, 600 runs a minute, is per host)."""
    config = work / "keys-config.json"
    config.write_text(json.dumps({"keys_file": str(work / "keys.json")}))
    key = sh(str(ROOT / ".venv" / "bin" / "stockade"), "keys", "add", "load", "--scope", "runs",
             "--scope", "metrics", "--runs-per-minute", "100000", "--config",
             str(config)).strip()
    return work / "keys.json", key


@dataclasses.dataclass
class Fleet:
    work: Path
    images: dict[str, Path]
    lb_port: int
    inventory: Path
    keys_file: Path
    key: str

    def write_inventory(self, addresses: bool) -> None:
        hosts = {h: ({"rolling_address": address(h)} if addresses else {}) for h in HOSTS}
        self.inventory.write_text(yaml.safe_dump({"stockade_fleet": {
            "hosts": hosts,
            "vars": {
                "ansible_connection": "community.general.lxc",
                "ansible_python_interpreter": "/usr/bin/python3",
                "rolling_lb_upstream_file": str(self.work / "lb" / "upstream.conf"),
                "rolling_lb_nginx_args": f"-p {self.work / 'lb'} -c {self.work / 'lb/nginx.conf'}",
                # A healthy host is ready in well under this; the broken one never is.
                "rolling_ready_timeout": READY_TIMEOUT_S,
                "rolling_keys_file": str(self.keys_file),
                "rolling_api_key": self.key,
                "rolling_trusted_proxies": [bridge_address()],
                # The session the test keeps busy holds its host this long, then is lost.
                "rolling_session_drain_timeout": SESSION_DRAIN_S,
            }}}))

    def playbook(self, name: str, image: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
               "ANSIBLE_HOST_KEY_CHECKING": "False"}
        return subprocess.run(
            ["ansible-playbook", "-i", str(self.inventory), str(ANSIBLE / name),
             "-e", f"rolling_image={self.images[image]}"],
            capture_output=True, text=True, env=env, timeout=1800, check=False)


class Load:
    """Clients posting runs to the load balancer until stopped; every failure is kept."""

    def __init__(self, port: int, key: str) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/runs"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = 0
        self.failures: list[str] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(CLIENTS)
        self.started = time.monotonic()
        self.futures = [self.pool.submit(self.client, i) for i in range(CLIENTS)]

    def client(self, index: int) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() - self.started < MAX_LOAD_S:
            n += 1
            value = index * 1_000_000 + n
            body = json.dumps({"code": f"print({value})"}).encode()
            request = urllib.request.Request(self.url, data=body, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    record = json.load(answer)
                failure = None if (record["status"], record["stdout"]) == (
                    "ok", f"{value}\n") else f"record {record}"
            except Exception as exc:  # every failure counts, whatever it is
                failure = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.done += 1
                if failure:
                    self.failures.append(failure)
                if self.done >= MAX_REQUESTS:
                    self.stop.set()
            self.stop.wait(THINK_S)

    def finish(self) -> tuple[int, list[str]]:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return self.done, self.failures


class SessionLoad:
    """One client keeping a session busy through the rollout, through the balancer: each
    answer must be the session's next count, until its host is replaced; then `410`, and
    nothing else (never another host's `404`, never a wrong count)."""

    def __init__(self, port: int, key: str) -> None:
        self.base = f"http://127.0.0.1:{port}/v1/sessions"
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.session = self.post(self.base, {})[1]["id"]
        self.counted = 0
        self.lost = ""
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.client)
        self.thread.start()

    def post(self, url: str, body: dict[str, str]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def client(self) -> None:
        runs = f"{self.base}/{self.session}/runs"
        if self.post(runs, {"code": "n = 0"})[0] != 200:
            self.failures.append("the session did not take its first cell")
            return
        started = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - started < MAX_LOAD_S:
            try:
                status, answer = self.post(runs, {"code": "n += 1\nn"})
            except Exception as exc:  # every failure counts, whatever it is
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            if status == 410:
                self.lost = answer["error"]["message"]
                return
            shown = [o["data"] for o in answer.get("outputs", [])]
            if status != 200 or shown != [str(self.counted + 1)]:
                self.failures.append(f"HTTP {status}: {answer}")
                return
            self.counted += 1
            self.stop.wait(0.3)

    def finish(self) -> tuple[int, str, list[str]]:
        self.stop.set()
        self.thread.join()
        return self.counted, self.lost, self.failures


def small_fleet_config(path: Path) -> None:
    """What this test proves is the rollout, not the pools: each host serves the default
    environment from one full, two lean and one session container (the image's own config
    warms every environment it carries, nine containers a host; the Molecule runner scenario
    and the image test prove those)."""
    config = json.loads(path.read_text())
    config.update(pool_size=1, lean_pool_size=2, environments={})
    config["sessions"] = {**config.get("sessions", {}), "pool_size": 1}
    path.write_text(json.dumps(config, indent=2) + "\n")


def unpack_images(work: Path) -> dict[str, Path]:
    new, old, broken = work / "new", work / "old", work / "broken"
    new.mkdir()
    sh("tar", "-C", str(new), "-xzpf", str(IMAGE), "--numeric-owner", "--xattrs",
       "--xattrs-include=*", "--strip-components=2", "./rootfs")
    for variant in (old, broken):
        sh("cp", "-a", "--reflink=auto", str(new), str(variant))
    for variant in (new, old):
        small_fleet_config(variant / "etc" / "stockade" / "runner.json")
    release = old / "etc" / "stockade-release"
    lines = [f"STOCKADE_COMMIT={OLD_COMMIT}" if line.startswith("STOCKADE_COMMIT=") else line
             for line in release.read_text().splitlines()]
    release.write_text("\n".join(lines) + "\n")
    (broken / "etc" / "stockade" / "runner.json").write_text("{ this is not json\n")
    return {"new": new, "old": old, "broken": broken}


def start_lb(directory: Path, port: int) -> None:
    directory.mkdir()
    (directory / "upstream.conf").write_text(
        "upstream stockade_fleet { server 127.0.0.1:9 down; }\n"
        "map $uri $stockade_fleet_route { default stockade_fleet; }\n")
    (directory / "nginx.conf").write_text(f"""
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    include {directory}/upstream.conf;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 4m;
        location / {{
            proxy_pass http://$stockade_fleet_route;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
""")
    sh("nginx", "-p", str(directory), "-c", str(directory / "nginx.conf"))


def destroy_hosts() -> None:
    for host in HOSTS:
        subprocess.run(["lxc-stop", "-n", host, "-k"], capture_output=True, check=False)
        subprocess.run(["lxc-destroy", "-n", host], capture_output=True, check=False)
    # lxc-stop on a cgroup v1 host leaves an empty lxc.pivot cgroup in every hierarchy.
    for pivot in Path("/sys/fs/cgroup").glob("*/lxc.pivot"):
        with contextlib.suppress(OSError):
            pivot.rmdir()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} is missing: run `make image` first")
    if shutil.which("ansible-playbook") is None:
        pytest.fail("ansible-playbook is not on PATH: run through `make roll-test`")
    sh(str(ROOT / "molecule" / "shared" / "lxc-net-up"))
    destroy_hosts()
    work = Path(tempfile.mkdtemp(prefix="stockade-roll-", dir="/var/tmp"))
    lb = work / "lb"
    try:
        fleet = Fleet(work, unpack_images(work), free_port(), work / "inventory.yml",
                      *make_key(work))
        start_lb(lb, fleet.lb_port)
        fleet.write_inventory(addresses=False)
        made = fleet.playbook("lxc_fleet.yml", "old")
        assert made.returncode == 0, made.stdout[-6000:] + made.stderr[-3000:]
        fleet.write_inventory(addresses=True)
        yield fleet
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            sh("nginx", "-p", str(lb), "-c", str(lb / "nginx.conf"), "-s", "stop")
        destroy_hosts()
        shutil.rmtree(work, ignore_errors=True)


def upstream(fleet: Fleet) -> list[str]:
    """The hosts in the balancer's upstream for runs (the first block of its file)."""
    text = (fleet.work / "lb" / "upstream.conf").read_text()
    block = text.split("upstream stockade_fleet {", 1)[1].split("}", 1)[0]
    return sorted(line.split()[1].rsplit(":", 1)[0] for line in block.splitlines()
                  if line.strip().startswith("server "))


def test_full_rollout_replaces_every_host_with_no_failed_request(fleet: Fleet) -> None:
    before = {h: machine_id(h) for h in HOSTS}
    assert {stamp(h)["STOCKADE_COMMIT"] for h in HOSTS} == {OLD_COMMIT}
    load = Load(fleet.lb_port, fleet.key)
    session = SessionLoad(fleet.lb_port, fleet.key)
    rollout = fleet.playbook("rolling_replace.yml", "new")
    done, failures = load.finish()
    counted, lost, session_failures = session.finish()
    assert rollout.returncode == 0, rollout.stdout[-6000:] + rollout.stderr[-3000:]
    assert failures == [], f"{len(failures)} of {done} requests failed: {failures[:5]}"
    assert done >= 100, f"only {done} requests during the rollout"
    # The session's requests reached its host until its drain gave up on it, then 410.
    assert session_failures == [], session_failures
    assert "replaced" in lost and counted >= SESSION_DRAIN_S / 0.5, (counted, lost)
    new_commit = (fleet.images["new"] / "etc/stockade-release").read_text()
    for host in HOSTS:
        assert f"STOCKADE_COMMIT={stamp(host)['STOCKADE_COMMIT']}" in new_commit, host
        assert machine_id(host) != before[host], f"{host} was not replaced"
    assert upstream(fleet) == sorted(address(h) for h in HOSTS)
    # The balancer's clients are on this host's loopback, and the hosts' nginx saw them so
    # (it would see the balancer's bridge address without real-ip; the rollout's own
    # checks come from that address directly, so they are logged with it).
    for host in HOSTS:
        runs = [line for line in attach(host, "cat", "/var/log/nginx/access.log").splitlines()
                if '"POST /v1/runs' in line]
        assert any(line.startswith("127.0.0.1 ") for line in runs), runs[-3:]
    print(f"full rollout: {done} requests, 0 failed")


def test_broken_image_stops_at_the_canary_with_no_failed_request(fleet: Fleet) -> None:
    fleet.write_inventory(addresses=True)
    before = {h: machine_id(h) for h in HOSTS}
    load = Load(fleet.lb_port, fleet.key)
    rollout = fleet.playbook("rolling_replace.yml", "broken")
    done, failures = load.finish()
    assert rollout.returncode != 0, "the broken image's rollout succeeded"
    assert failures == [], f"{len(failures)} of {done} requests failed: {failures[:5]}"
    assert done >= 20, f"only {done} requests during the rollout"
    canary, *rest = HOSTS
    assert f"failed: [{canary}]" in rollout.stdout or f"fatal: [{canary}" in rollout.stdout
    for host in rest:
        assert machine_id(host) == before[host], f"{host} was replaced after a failed canary"
    # The canary stays out of the load balancer; the rest serve.
    assert upstream(fleet) == sorted(address(h) for h in rest)
    print(f"broken canary: {done} requests, 0 failed")
