"""API keys and quotas, as units: scrypt hashes, the key file, the front's reloading view,
a caller's token bucket and its own limit caps."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

from stockade.limits import Limits, LimitsIn
from stockade.runner import keys
from stockade.runner.front.schema import ApiError
from stockade.runner.front.tenants import Tenant
from stockade.runner.keys import KeyFileError, KeyRing, Quota


def test_a_secret_matches_its_hash_only() -> None:
    stored = keys.hash_secret("right")
    assert stored.startswith("scrypt$16384$8$1$")
    assert keys.secret_matches("right", stored)
    assert not keys.secret_matches("wrong", stored)
    assert not keys.secret_matches("right", "md5$nope")
    assert not keys.secret_matches("right", stored.replace("scrypt$16384", "scrypt$99999999"))


def test_the_key_file_keeps_names_quotas_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = keys.add(path, "alice", Quota(runs_per_minute=60), group=None)
    assert keys.KEY.fullmatch(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    (record,) = keys.read(path).keys
    assert (record.name, record.quota.runs_per_minute) == ("alice", 60)
    assert key.split("_", 2)[2] not in path.read_text()
    with pytest.raises(KeyFileError, match="exists"):
        keys.add(path, "alice", Quota(), group=None)
    with pytest.raises(KeyFileError, match="a key's name"):
        keys.add(path, "../x", Quota(), group=None)
    keys.revoke(path, "alice", group=None)
    assert keys.read(path).keys == []
    with pytest.raises(KeyFileError, match="no key named"):
        keys.revoke(path, "alice", group=None)


def test_the_ring_hashes_only_keys_it_knows_and_survives_a_broken_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    key = keys.add(path, "bob", Quota(), group=None)
    ring = KeyRing(path)
    made_up = "stk_000000000000_" + "A" * 43
    assert ring.known(made_up) is None and ring.known("nonsense") is None
    wrong = key[:-3] + ("aaa" if not key.endswith("aaa") else "bbb")
    assert ring.known(wrong) is not None and ring.verify(wrong) is None  # a wrong secret
    assert ring.cached(key) is None
    assert ring.verify(key) is not None and ring.cached(key) is not None
    path.write_text("{ broken")
    with caplog.at_level(logging.WARNING):
        ring.maybe_reload(now_please=True)
        ring.maybe_reload(now_please=True)
    assert ring.known(key) is not None  # the keys loaded before stay
    assert len([r for r in caplog.records if "keeping the 1 keys" in r.message]) == 1


def tenant(quota: Quota) -> Tenant:
    async def make() -> Tenant:  # its semaphore belongs to a loop
        return Tenant("t", quota, concurrency=2, queue=4)
    return asyncio.run(make())


def test_the_bucket_allows_a_sixth_of_a_minute_at_once_then_says_when() -> None:
    caller = tenant(Quota(runs_per_minute=60))
    for _ in range(10):
        caller.spend_token()
    with pytest.raises(ApiError) as refused:
        caller.spend_token()
    assert (refused.value.status, refused.value.retry_after) == (429, 1)


def test_a_keys_own_caps_refuse_what_is_asked_and_lower_what_is_not() -> None:
    caller = tenant(Quota(maximum=LimitsIn(memory_mib=64)))
    lowered = caller.within_quota(None, Limits(memory_mib=128))
    assert lowered.memory_mib == 64 and lowered.cpu_time_s == Limits().cpu_time_s
    with pytest.raises(ApiError) as refused:
        caller.within_quota(LimitsIn(memory_mib=100), Limits(memory_mib=100))
    assert (refused.value.status, refused.value.field) == (403, "limits.memory_mib")
    with pytest.raises(ApiError, match="may not use metrics"):
        caller.check_scope("metrics")
