"""A refusal seen by one worker is never undone by another worker's write of an older login
(issue 9, review of item 4): the write is stamped before argon2 hashing, the refusal deletes the
row meanwhile, and the write used to re-create it with the refused password. ``Store.forget``
now leaves a "forgotten at T" marker that the conditional write consults; markers are pruned
(SQLite) or expired by the server (Redis) after ``FORGOTTEN_FOR`` seconds.

Real stores, two connections as two workers, two threads interleaved at the racy point.
"""

from __future__ import annotations

import threading
import time

import pytest
from argon2 import PasswordHasher

from gateway.plugins.cache.redis_store import RedisStore
from gateway.plugins.cache.store import FORGOTTEN_FOR, Entry, SQLiteStore
from support.net import free_port

KEY = "ab" * 32
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


@pytest.fixture(params=["sqlite", "redis"])
def workers(request, tmp_path, redis_server):
    """Two stores on one database: what two worker processes hold."""
    if request.param == "sqlite":
        made = [SQLiteStore(tmp_path / "cache.sqlite3") for _ in range(2)]
    else:
        prefix = f"race{free_port()}:"
        made = [RedisStore(redis_server.url, max_age=86400, key_prefix=prefix) for _ in range(2)]
    yield made
    made[0].purge()
    for store in made:
        store.close()


def entry(at: float, password: str) -> Entry:
    return Entry(KEY, "kid0", HASHER.hash(password), b"sealed", at)


def race(writer, refuser, remove) -> tuple[bool, object]:
    """Worker 1 stamps a live login, worker 2 removes the row, worker 1 hashes and writes."""
    stamped, removed = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def login() -> None:
        at = time.time()  # as OfflineCache.remember stamps, before hashing
        stamped.set()
        assert removed.wait(10)
        results["put"] = writer.put(entry(at, "refused-password"))

    def refuse() -> None:
        assert stamped.wait(10)
        results["removed"] = remove(refuser)
        removed.set()

    threads = [threading.Thread(target=login), threading.Thread(target=refuse)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(results) == {"put", "removed"}
    return results["put"], results["removed"]


def test_a_refusal_during_hashing_is_not_undone_by_the_write(workers):
    writer, refuser = workers
    writer.put(entry(time.time() - 60, "refused-password"))  # the user's earlier login

    put, removed = race(writer, refuser, lambda store: store.forget(KEY, time.time()))
    assert (put, removed) == (False, True)
    assert refuser.get(KEY) is None and writer.get(KEY) is None

    # A live login after the refusal (the directory accepted the user again) is stored.
    time.sleep(0.01)
    assert writer.put(entry(time.time(), "new-password"))
    assert refuser.get(KEY) is not None


def test_the_same_race_with_a_plain_delete_re_creates_the_row(workers):
    """The reference: what the refusal did before (a delete without a marker) loses the race."""
    writer, refuser = workers
    writer.put(entry(time.time() - 60, "refused-password"))
    put, removed = race(writer, refuser, lambda store: store.delete(KEY))
    assert (put, removed) == (True, True)
    assert refuser.get(KEY) is not None


def test_sqlite_markers_are_pruned_after_forgotten_for(tmp_path):
    store = SQLiteStore(tmp_path / "cache.sqlite3")
    try:
        start = time.time()
        for n in range(500):  # a spray of refused names
            store.forget(f"{n:064x}", start)
        count = store._run("SELECT count(*) FROM forgotten").fetchone()[0]
        assert count == 500
        store.forget(KEY, start + FORGOTTEN_FOR + 1)
        assert store._run("SELECT key FROM forgotten").fetchall() == [(KEY,)]
    finally:
        store.close()


def test_redis_markers_expire_and_are_never_listed(redis_server):
    store = RedisStore(redis_server.url, max_age=86400, key_prefix=f"race{free_port()}:")
    try:
        store.put(Entry(KEY, "kid0", "h", b"s", time.time() - 1))
        assert store.forget(KEY, time.time())
        ttl = store._redis.pttl(store._marker(KEY))
        assert 0 < ttl <= FORGOTTEN_FOR * 1000
        assert list(store.scan()) == []  # the marker is not an entry
    finally:
        store._redis.delete(store._marker(KEY))
        store.close()


def test_an_entry_deleted_while_its_password_is_checked_offline_answers_nothing(tmp_path):
    """Worker 1 checks a cached password offline (argon2, tens of milliseconds); meanwhile worker
    2's directory answers that the account is gone and deletes the entry. The refusal wins: the
    offline check that finishes afterwards allows nothing."""
    from gateway import Outcome
    from support.chainhelp import attempt, build, decide

    def runtime(ldap: dict):
        return build(tmp_path, {"chain": ["ldap"], "plugins": ["cache"]},
                     {"ldap": ldap, "cache": {"methods": ["ldap"]}},
                     targets={"cache": "gateway.plugins.cache:CachePlugin", "ldap": "support.testplugins:Directory"})

    password = "correct horse 3b9f"
    assert decide(runtime({"action": "success"}), attempt("carol", password)).step == "ldap"
    down = runtime({"action": "unavailable", "lookup": "unavailable"})
    assert decide(down, attempt("carol", password)).reason == "cache.offline"  # the entry answers

    gone = runtime({"action": "abstain", "lookup": "unknown"})
    offline = down.gateway.plugins["cache"].offline
    verify = offline._verify

    def verify_while_another_worker_refuses(encoded, password):
        assert gone.gateway.pm.hook.gateway_lookup_user(username="carol") is None
        return verify(encoded, password)

    offline._verify = verify_while_another_worker_refuses
    decision = decide(down, attempt("carol", password))
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)
    assert list(offline.store.scan()) == []
