"""Review of the cache plugin, purge and hash binding, against a real SQLite file and a real
redis-server, through the real plugin and the real ``authgw cache`` command code.

1. ``authgw cache purge [USER]`` was undone by a live login already under way: the directory
   accepted it, the operator then disabled the account and purged, and the login, still
   hashing, wrote the entry back (the purge left no "forgotten at" marker). The purge now
   forgets the user (one user) or leaves a store-wide marker (every entry), which the
   conditional write consults as it does a refusal's.
2. The stored password hash was not bound to the sealed part of the entry: a writer of the
   store could put an older hash of the same user into the current row, and the old (changed)
   password logged in offline. A digest of the hash is now sealed with the entry and checked
   before the password; an entry whose hash differs is deleted and logged.

The interleavings are made deterministic by holding the argon2 hashing step of the live login
until the purge has returned, instead of racing the clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from gateway import Outcome
from gateway.plugins.cache.cli import cache_command
from gateway.plugins.cache.store import Entry, SQLiteStore
from support.cacheenv import runtime as cache_runtime
from support.chainhelp import attempt

USER, OTHER = "alice-7c41", "bob-7c41"
OLD_PASSWORD, NEW_PASSWORD = "Old-Passw0rd 7c41", "New-Passw0rd 7c41"
#: How long a test waits for something that should happen at once (a guard against a hang,
#: never a bound on how fast anything runs).
HANG = 60


@pytest.fixture(params=["sqlite", "redis"])
def cache_settings(request, redis_server) -> dict:
    if request.param == "sqlite":
        return {}
    return {"store": "redis", "redis": {"url": redis_server.url, "key_prefix": f"r{uuid.uuid4().hex[:8]}:"}}


def runtime(tmp_path: Path, action: str, cache: dict):
    # Runtimes over one state directory share the key files and the store, as worker
    # processes (and the `authgw cache` command) do. refresh_after 0: every live login hashes
    # and writes, so that a repeat of the same password is a write under way too.
    return cache_runtime(tmp_path, {"action": action}, cache={"refresh_after": 0, **cache})


def offline(rt):
    return rt.gateway.plugins["cache"].offline


def decide(rt, username: str, password: str):
    return asyncio.run(rt.gateway.authenticate(attempt(username, password, deadline=HANG)))


def entries(rt) -> list[Entry]:
    return list(offline(rt).store.scan())


def cache_cli(tmp_path: Path, cache: dict, action: str, username: str | None = None) -> int:
    """``authgw cache ACTION [USERNAME]`` as the operator runs it: its own plugin instance over
    the same state directory and store (the command closes its store when done)."""
    command = cache_command(offline(runtime(tmp_path, "success", cache)))
    return command.run(argparse.Namespace(cache_action=action, username=username, expired=False))


class HeldHasher:
    """The plugin's argon2 hasher, with ``hash`` held until released: the live login has been
    accepted and stamped, and is hashing, for as long as the test wants."""

    def __init__(self, hasher) -> None:
        self._hasher = hasher
        self.hashing = threading.Event()
        self.release = threading.Event()

    def hash(self, password):
        self.hashing.set()
        assert self.release.wait(HANG)
        return self._hasher.hash(password)

    def __getattr__(self, name):
        return getattr(self._hasher, name)


def login_held_at_hashing(rt, username: str, password: str, monkeypatch) -> tuple[HeldHasher, threading.Thread, dict]:
    held = HeldHasher(offline(rt).hasher)
    monkeypatch.setattr(offline(rt), "hasher", held)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("decision", decide(rt, username, password)))
    thread.start()
    assert held.hashing.wait(HANG)
    return held, thread, result


# -- 1. a purge is not undone by a login already under way -----------------------------------------


@pytest.mark.parametrize("purge_one", [True, False], ids=["purge-user", "purge-all"])
def test_a_login_hashing_while_the_cache_is_purged_does_not_write_the_entry_back(tmp_path, cache_settings,
                                                                                 purge_one, monkeypatch):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, USER, OLD_PASSWORD).success
    assert len(entries(live)) == 1
    # A second live login of the user is accepted by the directory and is hashing when the
    # operator disables the account in the directory and purges it (docs/plugins/cache.md,
    # "Staleness").
    held, thread, result = login_held_at_hashing(live, USER, OLD_PASSWORD, monkeypatch)
    try:
        assert cache_cli(tmp_path, cache_settings, "purge", USER if purge_one else None) == 0
        assert entries(live) == []
    finally:
        held.release.set()
        thread.join(HANG)
    assert result["decision"].success  # the live answer stands; only its entry is not written
    assert entries(live) == []

    down = runtime(tmp_path, "unavailable", cache_settings)
    decision = decide(down, USER, OLD_PASSWORD)
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)

    # A live login that starts after the purge is stored as usual.
    assert decide(runtime(tmp_path, "success", cache_settings), USER, NEW_PASSWORD).success
    assert decide(down, USER, NEW_PASSWORD).reason == "cache.offline"


def test_purging_every_entry_refuses_a_write_under_way_for_any_user(tmp_path, cache_settings, monkeypatch):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, USER, OLD_PASSWORD).success
    # Another user's first live login is hashing when the whole cache is purged.
    held, thread, result = login_held_at_hashing(live, OTHER, OLD_PASSWORD, monkeypatch)
    try:
        assert cache_cli(tmp_path, cache_settings, "purge") == 0
    finally:
        held.release.set()
        thread.join(HANG)
    assert result["decision"].success and entries(live) == []


# -- 2. the stored hash is the one sealed with the entry -------------------------------------------


def write_hash(rt, row_key: str, password_hash: str) -> None:
    """Change only the hash of a row, as a store writer can: straight into the SQLite file with
    a connection of its own, or one field of the Redis hash."""
    store = offline(rt).store
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            assert db.execute("UPDATE entries SET hash = ? WHERE key = ?", (password_hash, row_key)).rowcount == 1
        db.close()
    else:
        assert store._redis.hset(store._name(row_key), b"hash", password_hash.encode()) == 0  # 0: replaced


def swap_in_an_older_hash(tmp_path: Path, cache: dict):
    """A live login with the old password, one with the new, then the first one's hash written
    into the current row; the live runtime."""
    live = runtime(tmp_path, "success", cache)
    assert decide(live, USER, OLD_PASSWORD).success
    [captured] = entries(live)  # a backup, a replica, read access to the store
    assert decide(live, USER, NEW_PASSWORD).success  # the password changed in the directory
    [current] = entries(live)
    assert current.password_hash != captured.password_hash
    write_hash(live, current.key, captured.password_hash)
    return live


def test_an_older_hash_put_into_the_current_row_is_refused_and_the_entry_deleted(tmp_path, cache_settings, caplog):
    swap_in_an_older_hash(tmp_path, cache_settings)
    down = runtime(tmp_path, "unavailable", cache_settings)
    with caplog.at_level(logging.WARNING):
        decision = decide(down, USER, OLD_PASSWORD)
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)  # never the old password
    assert entries(down) == []  # the altered row is gone
    assert [r.levelno for r in caplog.records if "password hash is not the one sealed" in r.getMessage()] \
        == [logging.WARNING]
    assert decide(down, USER, NEW_PASSWORD).outcome is Outcome.UNAVAILABLE


def test_cache_show_says_when_the_hash_was_changed_in_the_store(tmp_path, cache_settings, capsys):
    swap_in_an_older_hash(tmp_path, cache_settings)
    assert cache_cli(tmp_path, cache_settings, "show", USER) == 0
    assert "its password hash was changed in the store" in capsys.readouterr().out


def test_an_unchanged_entry_still_answers_offline(tmp_path, cache_settings):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, USER, OLD_PASSWORD).success
    assert decide(live, USER, NEW_PASSWORD).success
    [current] = entries(live)
    write_hash(live, current.key, current.password_hash)  # the same value written again

    down = runtime(tmp_path, "unavailable", cache_settings)
    assert decide(down, USER, NEW_PASSWORD).reason == "cache.offline"
    refused = decide(down, USER, OLD_PASSWORD)
    assert (refused.outcome, refused.reason) == (Outcome.INVALID_CREDENTIALS, "cache.invalid_password")
    assert len(entries(down)) == 1


def test_an_entry_sealed_without_the_hash_digest_is_not_used_until_the_next_live_login(tmp_path, cache_settings,
                                                                                        capsys):
    live = runtime(tmp_path, "success", cache_settings)
    assert decide(live, USER, OLD_PASSWORD).success
    [entry] = entries(live)
    from gateway.plugins.cache.keys import hash_bound  # here: the module imports on the previous version

    # As the previous version sealed it: the same document without the digest of the hash.
    keys = offline(live).keys()
    document = keys.open(entry.key, entry.sealed)
    assert hash_bound(document, entry.password_hash) is True
    assert hash_bound(document, entry.password_hash + "A") is False
    del document["hash_sha256"]
    assert hash_bound(document, entry.password_hash) is None
    nonce = b"\0" * 12  # one seal under this key in the test; the gateway's seals use random nonces
    plaintext = json.dumps(document, separators=(",", ":")).encode()
    store = offline(live).store
    store.delete(entry.key)
    assert store.put(Entry(entry.key, entry.kid, entry.password_hash,
                           nonce + keys.aead.encrypt(nonce, plaintext, keys._aad(entry.key)), entry.stored_at))

    assert cache_cli(tmp_path, cache_settings, "show", USER) == 0
    assert "written by an older version" in capsys.readouterr().out
    down = runtime(tmp_path, "unavailable", cache_settings)
    decision = decide(down, USER, OLD_PASSWORD)
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)

    # The user's next live login replaces it with a bound entry, which answers offline.
    assert decide(runtime(tmp_path, "success", cache_settings), USER, OLD_PASSWORD).success
    assert decide(down, USER, OLD_PASSWORD).reason == "cache.offline"
