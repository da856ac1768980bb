"""A deployed host serves only callers with an API key; the key file holds hashes alone;
each run is one JSON line in the journal, naming the key."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import testinfra.host

from api import post_run
from conftest import Caller, Instance, api_key_name


def refused(request: urllib.request.Request) -> tuple[int, dict[str, str]]:
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    return answer.value.code, json.load(answer.value)["error"]


def test_anonymous_runs_are_refused(instance: Instance) -> None:
    code, error = refused(Caller(instance, None).request("/v1/runs", {"code": "print(1)"}))
    assert (code, error["code"]) == (401, "key_required")


def test_a_made_up_key_is_refused(instance: Instance) -> None:
    fake = Caller(instance, "stk_000000000000_" + "A" * 43)
    code, error = refused(fake.request("/v1/runs", {"code": "print(1)"}))
    assert (code, error["code"]) == (401, "invalid_key")


def test_metrics_need_a_key_with_the_metrics_scope(instance: Instance, caller: Caller) -> None:
    code, _ = refused(Caller(instance, None).request("/metrics"))
    assert code == 401
    with urllib.request.urlopen(caller.request("/metrics"), timeout=30) as answer:
        assert b"stockade_build_info{" in answer.read()


def test_the_key_file_holds_hashes_only(host: testinfra.host.Host, api_key: str) -> None:
    keys = host.file("/var/lib/stockade/keys.json")
    assert (keys.user, keys.group, keys.mode) == ("root", "stockade", 0o640)
    assert api_key.split("_", 2)[2] not in keys.content_string  # stk_<id>_<secret>
    assert "scrypt$" in keys.content_string


def test_each_run_is_a_json_line_in_the_journal(host: testinfra.host.Host,
                                                caller: Caller) -> None:
    assert post_run(caller, "print('journal')")["stdout"] == "journal\n"
    name = api_key_name()
    deadline = time.monotonic() + 10
    while True:
        lines = host.check_output("journalctl -u stockade-front -o cat --no-pager -n 200")
        events = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
        runs = [event for event in events if event["event"] == "run"]
        if any(run["key"] == name for run in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    mine = [run for run in runs if run["key"] == name]
    assert mine and mine[-1]["status"] == "ok" and mine[-1]["request_id"], runs[-3:]
