"""A real runner and nginx in front of it, as local child processes on loopback ports of
their own: what the end-to-end tests and the benchmarks serve from. Root, like the runner.
Never for production: a deployed host runs the systemd unit the runner role installs."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from stockade.limits import LimitPolicy, Limits
from stockade.result import Result
from stockade.runner.config import DEFAULT_KEYS_FILE, RunnerConfig, SessionPolicy
from stockade.runner.front import nginx
from stockade.runner.keys import Quota
from stockade.runner.manager.containers import Containers

READY_TIMEOUT_S = 600.0  # the first start builds the sandbox image (Debian packages)


class LocalServiceError(RuntimeError):
    """A local runner or nginx did not start, stop or answer as it must."""


def runner_config(port: int, prefix: str, **overrides: Any) -> RunnerConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "pool_size": 2, "lean_pool_size": 2,
        "queue_timeout_s": 30.0, "container_prefix": prefix,
        "run_dir": f"/run/{prefix.rstrip('-')}",
        "limits": LimitPolicy(maximum=Limits(cpu_time_s=10, wall_time_s=20, memory_mib=512,
                                             processes=64, output_kib=1024,
                                             file_size_kib=65536)),
        "max_body_kib": 1024,
        # Tests and benchmarks call without a key unless they test keys; /metrics included.
        "anonymous": Quota(runs_per_minute=1_000_000, sessions=2, scopes=["runs", "metrics"]),
        # No session containers unless a test or benchmark is about sessions, and only the
        # default environment unless it is about environments.
        "sessions": SessionPolicy(pool_size=0),
        "environments": {},
    }
    values.update(overrides)
    return RunnerConfig(**values)


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def result(self) -> Result:
        if self.status != 200:
            raise LocalServiceError(f"HTTP {self.status}: {self.body[:2000]!r}")
        return msgspec.json.decode(self.body, type=Result)


def request(port: int, method: str, path: str, body: bytes | None = None, *,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Answer(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                      answer.read())
    finally:
        conn.close()


class Client:
    """Talks to a runner (or to nginx in front of one) on a loopback port, with `key` as
    its API key when one is given."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.port = port
        self.key = key

    def _headers(self, **more: str) -> dict[str, str]:
        return ({"Authorization": f"Bearer {self.key}"} if self.key else {}) | more

    def with_key(self, key: str | None) -> Client:
        return Client(self.port, key)

    def post(self, path: str, payload: Any, timeout: float = 60.0,
             headers: dict[str, str] | None = None) -> Answer:
        """A POST of `payload` (JSON, unless bytes); `headers` add to or replace the
        client's own (an Authorization of the caller's choosing)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        own = self._headers(**{"Content-Type": "application/json"})
        return request(self.port, "POST", path, body, timeout=timeout,
                       headers=own | (headers or {}))

    def get(self, path: str) -> Answer:
        return request(self.port, "GET", path, headers=self._headers())

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise LocalServiceError(f"no metric {name}")

    def wait_for_full_pool(self, size: int, timeout_s: float = 60.0) -> None:
        """Until every container of the pool is up and idle (dirty ones replaced)."""
        deadline = time.monotonic() + timeout_s
        while self.metric("stockade_pool_idle") < size:
            if time.monotonic() >= deadline:
                raise LocalServiceError(f"the pool did not refill within {timeout_s} s")
            time.sleep(0.05)

    def run(self, code: str, stdin: str = "", args: list[str] | None = None,
            files: list[dict[str, str]] | None = None, environment: str | None = None,
            **limits: Any) -> Result:
        payload = {"code": code, "stdin": stdin, "args": args or [], "files": files or [],
                   "limits": limits, "environment": environment}
        return self.post("/v1/runs", payload).result()


class RunnerProcess(Client):
    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(config.port)
        self.dir = tempfile.TemporaryDirectory(prefix="stockade-runner-local-")
        Path(self.dir.name).chmod(0o711)  # the front (the runner user) reads the key file
        if config.keys_file == DEFAULT_KEYS_FILE:  # never the host's own keys
            config = msgspec.structs.replace(config, keys_file=f"{self.dir.name}/keys.json")
        self.config = config
        self.config_path = Path(self.dir.name) / "runner.json"
        self.config_path.write_bytes(msgspec.json.encode(config))
        self.log_path = Path(self.dir.name) / "runner.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, *serve_args: str) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stockade", "serve", "--config", str(self.config_path),
                 *serve_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        if wait:
            self.wait_ready()

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise LocalServiceError("the runner was never started")
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc().poll()
            if code is not None:
                raise LocalServiceError(f"the runner exited ({code}):\n{self.log()}")
            try:
                if self.get("/readyz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise LocalServiceError(f"the runner was not ready within {timeout_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        proc = self._proc()
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise LocalServiceError(f"the runner did not stop within {timeout_s} s:\n{self.log()}"
                                 ) from None
        return code

    def kill_everything(self) -> None:
        """SIGKILL the whole service (manager and front), as a crash would."""
        proc = self._proc()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def containers(self) -> list[str]:
        return Containers(self.config).existing()

    def add_key(self, name: str, *options: str) -> str:
        """A new key for this runner, made as an operator makes one: `stockade keys add`."""
        made = subprocess.run([sys.executable, "-m", "stockade", "keys", "add", name,
                               "--config", str(self.config_path), *options],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise LocalServiceError(f"keys add {name} failed: {made.stderr}")
        return made.stdout.strip()

    def revoke_key(self, name: str) -> None:
        subprocess.run([sys.executable, "-m", "stockade", "keys", "revoke", name,
                        "--config", str(self.config_path)], capture_output=True, check=True)

    def close(self) -> None:
        self.dir.cleanup()


@contextlib.contextmanager
def serving(config: RunnerConfig, nginx_port: int) -> Iterator[tuple[RunnerProcess,
                                                                    NginxProcess]]:
    """A runner and nginx in front of it, both stopped (and cleaned) on the way out, an
    interrupted start-up included."""
    runner = RunnerProcess(config)
    try:
        runner.start()
        proxy = NginxProcess(config, nginx_port)
        try:
            proxy.start()
            yield runner, proxy
        finally:
            proxy.stop()
    finally:
        if runner.proc is not None:
            runner.stop()
        runner.close()


class NginxProcess(Client):
    """nginx with the rendered stockade site, in a directory of its own."""

    def __init__(self, runner: RunnerConfig, port: int,
                 trusted_proxies: list[str] | None = None) -> None:
        super().__init__(port)
        self.runner = runner
        self.dir = tempfile.TemporaryDirectory(prefix="stockade-nginx-local-")
        root = Path(self.dir.name)
        root.chmod(0o711)  # nginx's workers (nobody) reach the body temp dir the master makes
        site = nginx.render(runner, listen=f"127.0.0.1:{port}", access_log=f"{root}/access.log",
                            trusted_proxies=trusted_proxies)
        (root / "stockade.conf").write_text(site)
        (root / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/stockade.conf;
}}
""")
        self.conf = root / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        check = subprocess.run(["nginx", "-t", "-c", str(self.conf)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise LocalServiceError(f"nginx refuses its config: {check.stderr}")
        self.proc = subprocess.Popen(["nginx", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise LocalServiceError("nginx did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()
