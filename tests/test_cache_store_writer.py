"""What someone who can write to the store, without the pepper or the encryption key, can do to
offline logins (review of the cache plugin, items 1 and 2), against a real SQLite file and a
real redis-server.

The row's time and failure count are the store's own fields, readable and writable by anyone
with write access (a Redis ACL user, the database file). The time of the live login is now also
sealed with the identity; offline answers judge ``max_age`` by the sealed copy and do not use a
row whose two times differ. The argon2 parameters were taken from the stored hash string, so a
writer could make every verify cost 2 GiB and seconds; a hash with parameters other than the
configured ones is now not verified at all.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from gateway import Outcome
from gateway.plugins.cache.offline import identity_from
from gateway.plugins.cache.store import Entry, SQLiteStore
from support.chainhelp import attempt, build, decide

CACHE = "gateway.plugins.cache:CachePlugin"
USER, PASSWORD = "bob-5d2a", "old-Passw0rd 5d2a"
DAY = 86400.0


@pytest.fixture(params=["sqlite", "redis"])
def cache_settings(request, redis_server) -> dict:
    if request.param == "sqlite":
        return {}
    return {"store": "redis", "redis": {"url": redis_server.url, "key_prefix": f"w{uuid.uuid4().hex[:8]}:"}}


def runtime(tmp_path: Path, action: str, cache: dict, **extra):
    # Runtimes over one state directory share the key files, as worker processes do.
    return build(tmp_path, {"chain": ["ldap"], "plugins": ["cache"]},
                 {"ldap": {"action": action}, "cache": {**cache, **extra}}, targets={"cache": CACHE})


def offline(rt):
    return rt.gateway.plugins["cache"].offline


def the_entry(rt) -> Entry:
    [entry] = list(offline(rt).store.scan())
    return entry


def overwrite(rt, entry: Entry) -> None:
    """Write *entry* as a store writer would: straight into the store, no conditions, and for
    Redis without an expiry."""
    store = offline(rt).store
    if isinstance(store, SQLiteStore):
        store._run("INSERT OR REPLACE INTO entries (key, kid, hash, sealed, stored_at, failures) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (entry.key, entry.kid, entry.password_hash, entry.sealed,
                                                entry.stored_at, entry.failures))
    else:
        store._redis.delete(store._name(entry.key))
        store._redis.hset(store._name(entry.key), mapping={
            b"kid": entry.kid.encode(), b"hash": entry.password_hash.encode(), b"sealed": entry.sealed,
            b"at": repr(entry.stored_at).encode(), b"fail": str(entry.failures).encode()})


def sealed_at(rt, entry: Entry, at: float, password_hash: str | None = None) -> Entry:
    """*entry* as a live login at *at* would have written it (for an entry older than now), with
    *password_hash* in place of its own when given."""
    keys = offline(rt).keys()
    document = keys.open(entry.key, entry.sealed)
    password_hash = entry.password_hash if password_hash is None else password_hash
    return replace(entry, sealed=keys.seal(entry.key, identity_from(document, at), document["step"], at,
                                           password_hash=password_hash),
                   stored_at=at, password_hash=password_hash)


def test_a_captured_row_put_back_with_a_fresh_time_after_a_refusal_is_not_used(tmp_path, cache_settings):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, attempt(USER, PASSWORD)).success
    captured = the_entry(live)
    # The directory refuses bob (password changed, account disabled): the row goes.
    refusing = runtime(tmp_path, "invalid", cache_settings)
    assert decide(refusing, attempt(USER, PASSWORD)).outcome is Outcome.INVALID_CREDENTIALS
    assert offline(refusing).rechecked(30)  # the refused password compared with the cached one
    assert list(offline(live).store.scan()) == []
    # A store writer puts the captured row back, stamped now, failure count 0.
    overwrite(live, replace(captured, stored_at=time.time() + 1, failures=0))

    down = runtime(tmp_path, "unavailable", cache_settings)
    decision = decide(down, attempt(USER, PASSWORD))
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)  # never the old password
    assert list(offline(down).store.scan()) == []  # and the altered row is gone


def test_a_replayed_row_older_than_max_age_is_refused_by_its_sealed_time(tmp_path, cache_settings):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, attempt(USER, PASSWORD)).success
    captured = the_entry(live)
    down = runtime(tmp_path, "unavailable", cache_settings)
    overwrite(live, sealed_at(live, captured, time.time() - 6 * DAY))  # as written 6 days ago: answers
    assert decide(down, attempt(USER, PASSWORD)).reason == "cache.offline"

    old = sealed_at(live, captured, time.time() - 8 * DAY)  # captured 8 days ago (max_age 7d)
    overwrite(live, old)  # put back as captured
    assert decide(down, attempt(USER, PASSWORD)).outcome is Outcome.UNAVAILABLE
    overwrite(live, replace(old, stored_at=time.time()))  # put back with a fresh time
    assert decide(down, attempt(USER, PASSWORD)).outcome is Outcome.UNAVAILABLE
    overwrite(live, replace(old, stored_at=time.time() - 6 * DAY))  # or any time within max_age
    assert decide(down, attempt(USER, PASSWORD)).outcome is Outcome.UNAVAILABLE


def _params(encoded: str) -> str:
    return encoded.split("$")[3]


@pytest.mark.parametrize("change", [
    lambda h: h.replace(_params(h), "m=2097152,t=1,p=1"),  # 2 GiB per verify
    lambda h: h.replace(_params(h), "m=19456,t=20,p=1"),  # seconds per verify
    lambda h: h.replace(_params(h), "m=8,t=1,p=1"),  # cheaper than configured
    lambda h: h.replace(_params(h), "m=19456,t=2,p=2"),
    lambda h: h.replace("$argon2id$", "$argon2i$"),
    lambda h: h.replace("$v=19$", "$v=16$"),
    lambda h: h.replace(_params(h), "m=019456,t=2,p=1"),  # the same number, spelled otherwise
    lambda h: h[:h.rindex("$")] + "$" + h[h.rindex("$") + 1:] + "AAAA",  # a longer hash
], ids=["2GiB", "t20", "weaker", "p2", "argon2i", "v16", "leading-zero", "hash-len"])
def test_a_hash_with_other_argon2_parameters_is_never_verified(tmp_path, cache_settings, change, caplog,
                                                               monkeypatch):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, attempt(USER, PASSWORD)).success
    entry = the_entry(live)
    # Sealed with the changed hash, as a gateway configured with those parameters would have
    # written it: a store writer's change alone fails the sealed hash digest first (see
    # test_cache_review.py); this checks the parameter check on its own.
    overwrite(live, sealed_at(live, entry, entry.stored_at, change(entry.password_hash)))

    down = runtime(tmp_path, "unavailable", cache_settings)
    verified = []
    monkeypatch.setattr(offline(down), "_verify", lambda *args: verified.append(args) or False)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            decision = decide(down, attempt(USER, PASSWORD))
            assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)  # absent
    assert verified == []  # no argon2 run with the store's parameters
    assert the_entry(down).failures == 0  # no offline attempt counted
    warnings = [r for r in caplog.records if "argon2 parameters" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per process


def test_entries_hashed_before_the_argon2_parameters_changed_are_not_used(tmp_path, cache_settings):
    assert decide(runtime(tmp_path, "success", cache_settings), attempt(USER, PASSWORD)).success
    raised = {"argon2": {"memory_cost": 32 * 1024}}
    assert decide(runtime(tmp_path, "unavailable", cache_settings, **raised),
                  attempt(USER, PASSWORD)).outcome is Outcome.UNAVAILABLE
    # The next live login hashes with the new parameters; offline answers work again.
    assert decide(runtime(tmp_path, "success", cache_settings, **raised), attempt(USER, PASSWORD)).success
    decision = decide(runtime(tmp_path, "unavailable", cache_settings, **raised), attempt(USER, PASSWORD))
    assert (decision.outcome, decision.reason) == (Outcome.SUCCESS, "cache.offline")
