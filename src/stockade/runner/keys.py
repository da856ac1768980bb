"""API keys: who may run code, and how much. A key is shown once, when it is made; the key
file keeps only its scrypt hash, so a leaked file gives no one a key.

A key reads `stk_<id>_<secret>`: the id (not secret) finds the record without hashing, so a
stranger's made-up key costs nothing; only a presented key whose id exists is hashed, and a
verified one is remembered by its SHA-256 so each key pays for scrypt once per process.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from stockade.limits import FIELDS, LimitsIn

KEY = re.compile(r"stk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_KEYS = 1000  # also what bounds the `key` label of the runner's metrics
MAX_FILE_BYTES = 4 << 20
# scrypt with 16 MiB and ~50 ms per hash: RFC 7914's interactive-login parameters.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
RELOAD_EVERY_S = 1.0
Scope = Literal["runs", "metrics"]
SCOPES: tuple[Scope, ...] = ("runs", "metrics")
log = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key file or a key command that cannot be used; the message says why."""


class Quota(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one caller may do: a key's, or anonymous callers' together."""

    # Runs started per minute, sustained; up to a sixth of it may come at once.
    runs_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 600
    # Runs at once (0: as many as the pool has containers) and runs waiting for one
    # (0: half the runner's wait queue): past either, 429.
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    queue: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # Sessions alive at once (0: half the runner's session pool, at least one).
    sessions: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    # The most this caller may ask for, below the runner's own caps (unset: those caps).
    maximum: LimitsIn = LimitsIn()
    scopes: list[Scope] = msgspec.field(default_factory=lambda: ["runs"])


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    id: str
    hash: str  # scrypt$N$r$p$salt$digest (base64)
    created: str
    quota: Quota = Quota()


class KeyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Literal[1] = 1
    keys: list[KeyRecord] = []


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 << 20, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def secret_matches(secret: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or int(n) > 1 << 20:
            return False
        computed = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n),
                                  r=int(r), p=int(p), maxmem=256 << 20, dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


# -- the file (written by `stockade keys` as root, read by the front) -------------------------


def read(path: Path) -> KeyFile:
    """The key file; a missing one holds no keys."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return KeyFile()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise KeyFileError(f"the key file {path} is over {MAX_FILE_BYTES >> 20} MiB")
    try:
        found = msgspec.json.decode(raw, type=KeyFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise KeyFileError(f"the key file {path} is invalid: {exc}") from None
    if len({record.name for record in found.keys}) != len(found.keys):
        raise KeyFileError(f"the key file {path} names a key twice")
    return found


def write(path: Path, keys: KeyFile, group: int | None) -> None:
    """Replace the file in one step: readers see the old keys or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o640)
            if group is not None:
                os.fchown(handle.fileno(), 0, group)
            handle.write(msgspec.json.format(msgspec.json.encode(keys)) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def add(path: Path, name: str, quota: Quota, group: int | None) -> str:
    """Make a key named `name` and return it: the only time it is ever shown."""
    if not NAME.fullmatch(name):
        raise KeyFileError(f"a key's name is 1-64 of a-z, 0-9, '_', '.', '-', starting with a "
                        f"letter or digit; got {name!r}")
    existing = read(path)
    if any(record.name == name for record in existing.keys):
        raise KeyFileError(f"a key named {name!r} exists; revoke it first or pick another name")
    if len(existing.keys) >= MAX_KEYS:
        raise KeyFileError(f"the key file holds {MAX_KEYS} keys already; revoke unused ones")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = KeyRecord(name, key_id, hash_secret(secret), created, quota)
    write(path, KeyFile(keys=[*existing.keys, record]), group)
    return f"stk_{key_id}_{secret}"


def revoke(path: Path, name: str, group: int | None) -> None:
    existing = read(path)
    kept = [record for record in existing.keys if record.name != name]
    if len(kept) == len(existing.keys):
        raise KeyFileError(f"no key named {name!r}; `stockade keys list` names them")
    write(path, KeyFile(keys=kept), group)


def describe(record: KeyRecord) -> str:
    quota = record.quota
    caps = [f"{f.name}<={getattr(quota.maximum, f.name)}" for f in FIELDS
            if getattr(quota.maximum, f.name) is not None]
    return (f"{record.name}\tstk_{record.id}_…\t{record.created}\t"
            f"{quota.runs_per_minute}/min\tconcurrency {quota.concurrency or 'pool'}\t"
            f"sessions {quota.sessions or 'default'}\tscopes {','.join(quota.scopes)}\t"
            f"{' '.join(caps) or 'runner caps'}")


# -- the front's view ---------------------------------------------------------------------


class KeyRing:
    """The keys the front accepts, reread when the file changes (checked at most once a
    second), so a revoked key stops working within a second, without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_id: dict[str, KeyRecord] = {}
        self.verified: dict[bytes, str] = {}  # SHA-256 of a presented key -> its record id
        self.seen: tuple[int, int, int] | None = None
        self.loaded = False
        self.broken: str | None = None  # the key file's last problem, already logged
        self.checked = 0.0
        self.hashing = threading.Lock()  # one scrypt at a time: guessing cannot eat the CPUs
        self.reload()

    def reload(self) -> None:
        try:
            st = self.path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            raise KeyFileError(f"cannot reach the key file {self.path}: {exc.strerror} (the "
                               "runner's user must be able to enter its directory)") from None
        if self.loaded and seen == self.seen:
            return
        found = read(self.path)
        self.by_id = {record.id: record for record in found.keys}
        self.verified = {}
        self.seen = seen
        self.loaded = True

    def maybe_reload(self, now_please: bool = False) -> None:
        """Reread a changed file (a stat at most once a second, unless `now_please`: a key
        not seen before may be a minute old); a broken file leaves the keys as they were."""
        now = time.monotonic()
        if now - self.checked < RELOAD_EVERY_S and not now_please:
            return
        self.checked = now
        try:
            self.reload()
        except KeyFileError as exc:
            if str(exc) != self.broken:  # once per new problem, not once a second
                log.warning(f"keeping the {len(self.by_id)} keys loaded before: {exc}")
            self.broken = str(exc)
        else:
            self.broken = None

    def known(self, key: str) -> KeyRecord | None:
        """The record a well-formed key claims to be, or None; no hashing yet."""
        match = KEY.fullmatch(key)
        return self.by_id.get(match.group(1)) if match else None

    def cached(self, key: str) -> KeyRecord | None:
        record_id = self.verified.get(hashlib.sha256(key.encode()).digest())
        return self.by_id.get(record_id) if record_id else None

    def verify(self, key: str) -> KeyRecord | None:
        """In a worker thread: the key's record if its secret is right (then remembered)."""
        match = KEY.fullmatch(key)
        record = self.by_id.get(match.group(1)) if match else None
        if record is None or match is None:
            return None
        with self.hashing:
            if not secret_matches(match.group(2), record.hash):
                return None
        self.verified[hashlib.sha256(key.encode()).digest()] = record.id
        return record
