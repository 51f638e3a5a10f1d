"""The session stores against a real redis-server and a real SQLite file: a touch or an update
of a session never brings back one that was deleted (a logout) meanwhile, and never overwrites
another worker's write. The interleavings are made deterministic by running the other worker's
call (a second store object, its own connection) between the store's read and its write."""

from __future__ import annotations

import pytest

from gateway.plugins.login.sessions import RedisStore, SqliteStore


KEY = "k" * 64
DATA = {"identity": {"subject": "alice", "groups": []}, "index": "_i", "checked": 0.0, "directory": None}


@pytest.fixture(params=["sqlite", "redis"])
def stores(request, tmp_path, redis_server):
    """Two store objects on one backing store, as two workers (or instances) have."""
    if request.param == "sqlite":
        made = [SqliteStore(tmp_path / "sessions.sqlite3") for _ in range(2)]
    else:
        redis_server.client().flushdb()
        made = [RedisStore(redis_server.url, 3600) for _ in range(2)]
    yield made
    for store in made:
        store.close()


class AfterRead:
    """Wraps a Redis client: right after the next GET of a session record, *then* runs (another
    worker's call landing between this worker's read and its write)."""

    def __init__(self, client, then) -> None:
        self.client, self.then = client, then

    def get(self, name):
        raw = self.client.get(name)
        if self.then is not None and name.startswith("authgw:login:s:"):
            then, self.then = self.then, None
            then()
        return raw

    def __getattr__(self, name):
        return getattr(self.client, name)


def between_read_and_write(store, then) -> None:
    """Make *then* run between *store*'s read of a session and its write (Redis); SQLite's
    UPDATE has no such gap, so *then* runs first: the same order the Redis store used to lose."""
    if isinstance(store, RedisStore):
        store.redis = AfterRead(store.redis, then)
    else:
        then()


@pytest.mark.parametrize("change", ["touch", "update"])
def test_a_session_deleted_during_a_touch_or_update_stays_deleted(stores, change):
    worker, logout = stores
    worker.put_session(KEY, DATA, 1000.0)
    between_read_and_write(worker, lambda: logout.delete_session(KEY))
    if change == "touch":
        worker.touch_session(KEY, 2000.0)
    else:
        worker.update_session(KEY, {**DATA, "checked": 2000.0})
    assert worker.get_session(KEY) is None and logout.get_session(KEY) is None
    if isinstance(worker, RedisStore):
        assert not worker.redis.client.exists(f"authgw:login:s:{KEY}")


def test_touch_and_update_of_a_deleted_session_do_nothing(stores):
    store, _ = stores
    store.touch_session(KEY, 2000.0)
    store.update_session(KEY, DATA)
    assert store.get_session(KEY) is None


def test_an_update_and_a_concurrent_touch_both_stay(stores):
    worker, other = stores
    worker.put_session(KEY, DATA, 1000.0)
    between_read_and_write(worker, lambda: other.touch_session(KEY, 1500.0))
    worker.update_session(KEY, {**DATA, "checked": 1400.0})
    data, created, seen = other.get_session(KEY)
    assert (data["checked"], created, seen) == (1400.0, 1000.0, 1500.0)
    assert data["identity"]["groups"] == []  # the record is the JSON Python wrote, not re-encoded


def test_a_touch_keeps_the_record_and_renews_the_expiry(stores):
    store, _ = stores
    store.put_session(KEY, DATA, 1000.0)
    if isinstance(store, RedisStore):
        store.redis.expire(f"authgw:login:s:{KEY}", 5)
    store.touch_session(KEY, 1234.5)
    assert store.get_session(KEY) == (DATA, 1000.0, 1234.5)
    if isinstance(store, RedisStore):
        assert store.redis.ttl(f"authgw:login:s:{KEY}") > 5  # the session's whole life again, as before


def test_expired_parked_requests_are_purged_without_any_sign_in(tmp_path):
    """Anyone can park a request (/saml/sso, /oidc/authorize): parking purges the expired ones,
    at most once a minute, so requests nobody finishes do not pile up in the file."""
    from gateway.plugins.login.sessions import SessionManager
    from gateway.plugins.login.settings import SessionSettings

    store = SqliteStore(tmp_path / "sessions.sqlite3")
    manager = SessionManager(SessionSettings(), store, b"k" * 32)
    try:
        def pending() -> int:
            return store.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

        for _ in range(50):
            manager.park({"request": "x" * 1000}, lifetime=-1.0)  # expired at once
        assert pending() == 50  # the first park purged (nothing yet); the next ones within the minute did not
        manager._last_purge -= 61  # a minute later
        kept = manager.park({"request": "live"}, lifetime=600)
        assert pending() == 1 and manager.peek(kept) == {"request": "live"}
    finally:
        store.close()


# -- bounded sessions: at most sessions.max_per_user per subject, idle ones purged (review of
# resource exhaustion: one valid password made 2,386 sessions a minute, none ever capped, and
# idle-expired sessions stayed until `absolute`) ---------------------------------------------------

import logging
import sqlite3
import threading
import time

from gateway import Identity
from gateway.plugins.login.sessions import SessionManager
from gateway.plugins.login.settings import SessionSettings


def who(subject: str) -> Identity:
    return Identity(subject=subject, username=subject, method="password", authenticated_at=time.time())


def manager_on(store, **settings) -> SessionManager:
    return SessionManager(SessionSettings(**settings), store, b"k" * 32)


def session_rows(store) -> dict[str, int]:
    """What the store holds of sessions: records, participants, SessionIndex records."""
    if isinstance(store, RedisStore):
        client = store.redis
        count = lambda pattern: len(client.keys(f"authgw:login:{pattern}"))  # noqa: E731
        return {"sessions": count("s:*"), "participants": sum(client.hlen(k) for k in client.keys("authgw:login:sp:*")),
                "indexes": count("p:idx:*")}
    db = store.db
    return {"sessions": db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
            "participants": db.execute("SELECT COUNT(*) FROM participants").fetchone()[0],
            "indexes": db.execute("SELECT COUNT(*) FROM pending WHERE key LIKE 'idx:%'").fetchone()[0]}


def test_a_new_session_beyond_max_per_user_ends_the_subjects_oldest_with_its_rows(stores, caplog):
    """POST /login again and again without the cookie made a session each time, without end."""
    store, other_worker = stores
    first, second = manager_on(store, max_per_user=3), manager_on(other_worker, max_per_user=3)
    made = []
    for n in range(5):  # two workers, one subject: the bound is the store's, not a worker's
        cookie, session = (first if n % 2 else second).create(who("alice"))
        first.add_participant(session, f"https://sp{n}.example.test", {"name_id": f"n{n}", "format": "f",
                                                                      "index": session.index})
        made.append((cookie, session))
        time.sleep(0.01)  # distinct creation times: "oldest" is well defined
    bob_cookie, bob = first.create(who("bob"))
    with caplog.at_level(logging.INFO, logger="authgw.plugin.login"):
        newest_cookie, newest = first.create(who("alice"))
    live = [first.get(cookie) for cookie, _ in made] + [first.get(newest_cookie)]
    assert [s is not None for s in live] == [False, False, False, True, True, True]
    assert first.get(bob_cookie) is not None  # another subject's sessions are not counted
    for _, ended in made[:3]:  # every row of an ended session went with it
        assert first.participants(ended.key) == {} and first.key_of_index(ended.index) is None
        assert store.get_session(ended.key) is None
    for _, kept in made[3:]:
        assert first.key_of_index(kept.index) == kept.key and len(first.participants(kept.key)) == 1
    assert session_rows(store) == {"sessions": 4, "participants": 2, "indexes": 4}
    assert "older session(s) of alice ended (sessions.max_per_user: 3)" in caplog.text
    assert "https://sp2.example.test" in caplog.text  # the services not told are named
    # A logout ends a session with every row that belongs to it, its SessionIndex record too.
    first.end(newest_cookie)
    assert first.key_of_index(newest.index) is None
    assert session_rows(store) == {"sessions": 3, "participants": 2, "indexes": 3}


def test_the_cap_holds_when_workers_sign_one_subject_in_at_once(stores):
    managers = [manager_on(store, max_per_user=4) for store in stores]
    errors: list[BaseException] = []

    def sign_in(manager) -> None:
        try:
            for _ in range(25):
                manager.create(who("carol"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sign_in, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert session_rows(stores[0]) == {"sessions": 4, "participants": 0, "indexes": 4}


@pytest.mark.parametrize("first", ["older", "newer"])
def test_two_sign_ins_at_once_never_end_each_others_new_session(stores, first):
    """Two workers insert a session of one subject each, then each limits (max_per_user 1):
    each took the other's new session for an older one and ended it, so both sign-ins got a
    dead cookie (review of an earlier stop). One stays, whichever limit runs first, and the cap
    holds once both have run. The order is the one the sessions were recorded in: SQLite's
    writes (B, written second, stays); Redis's limit script, where a session joins its subject's
    set (the one limited second stays). Neither is their ``created`` time, taken before writes
    that may wait (a session dated first but written last was over the cap for good: 5 against
    4 in the worker race test); here B is written second but dated first."""
    now = time.time()
    older, newer = ("A", now + 0.001), ("B", now)

    def record(key: str) -> dict:
        return {"identity": {"subject": "frank"}, "index": "_" + key, "checked": 0.0}

    stores[0].put_session(older[0], record(older[0]), older[1])
    stores[1].put_session(newer[0], record(newer[0]), newer[1])
    order = [(stores[0], older[0]), (stores[1], newer[0])]
    for store, key in (order if first == "older" else order[::-1]):
        store.limit_subject("frank", key, 1, now + 0.002, 1800, 28800)
    stays = "B" if isinstance(stores[0], SqliteStore) or first == "older" else "A"
    assert [k for k in "AB" if stores[0].get_session(k) is not None] == [stays]
    stores[0].put_session("C", record("C"), now - 1)  # the next sign-in holds the cap again
    stores[0].limit_subject("frank", "C", 1, now + 0.003, 1800, 28800)
    assert [k for k in "ABC" if stores[0].get_session(k) is not None] == ["C"]


def test_a_session_ended_as_it_is_made_leaves_no_index_record(stores):
    """Another worker's sign-in of the same subject, between this one's session write and its
    SessionIndex write, ended the new session as the older one (max_per_user 1); the index
    record written after it named no session and stayed (a flaky count of 5 against 4 in the
    worker race test). The index record is now written first and goes with the session.
    (Redis: the other sign-in's limit does not see a session before it joins its subject's set,
    in its own limit; that one joins last and ends the other's.)"""
    first, second = manager_on(stores[0], max_per_user=1), manager_on(stores[1], max_per_user=1)
    put_session = stores[0].put_session

    def then_another_sign_in(*args, **kwargs):
        put_session(*args, **kwargs)
        second.create(who("gina"))

    stores[0].put_session = then_another_sign_in
    first.create(who("gina"))
    if isinstance(stores[0], RedisStore):
        keys = sorted(k.decode().rsplit(":", 1)[0] for k in stores[0].redis.keys("authgw:login:*"))
        assert keys == ["authgw:login:p:idx", "authgw:login:s", "authgw:login:u"]
    else:
        assert session_rows(stores[0]) == {"sessions": 1, "participants": 0, "indexes": 1}


def test_a_reauthentication_over_a_session_keeps_its_index_through_the_cap(stores):
    """The same user signing in over a session keeps its SessionIndex; the old session's end
    (and the cap's) must not take the index record that now names the new one."""
    manager = manager_on(stores[0], max_per_user=1)
    cookie, old = manager.create(who("dave"))
    cookie, new = manager.create(who("dave"), cookie)
    assert new.index == old.index and manager.key_of_index(new.index) == new.key
    assert manager.get(cookie) is not None
    assert session_rows(stores[0]) == {"sessions": 1, "participants": 0, "indexes": 1}


def test_a_lock_held_on_the_sqlite_store_is_an_outage_not_a_frozen_loop(tmp_path):
    # The worker's connection is used on its event loop: a lock held by another process (an
    # operator's sqlite3 shell mid-transaction) made each call wait 5 s there, /auth included.
    import time

    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.put_pending("k", {"v": 1}, time.time() + 60)
        # a bound on a wait, not a benchmark: the store's BUSY_TIMEOUT (0.5 s), not 5 s
        assert time.monotonic() - started < 5 * SqliteStore.BUSY_TIMEOUT
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.put_pending("k", {"v": 1}, time.time() + 60) and store.get_pending("k", time.time()) == {"v": 1}


def test_sessions_idle_past_idle_are_purged_with_their_rows(tmp_path):
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    manager = manager_on(store, idle=5, absolute=3600)
    try:
        idle = [manager.create(who(f"user{n}"))[1] for n in range(600)]  # more than one purge batch
        for session in idle:
            manager.add_participant(session, "https://sp.example.test", {"name_id": "x"})
        cookie, used = manager.create(who("erin"))
        manager.add_participant(used, "https://sp.example.test", {"name_id": "y"})
        store.db.execute("UPDATE sessions SET seen = seen - 10 WHERE key != ?", (used.key,))  # idle 10 s ago
        assert session_rows(store) == {"sessions": 601, "participants": 601, "indexes": 601}
        store.purge(time.time(), time.time() - 3600)
        assert session_rows(store) == {"sessions": 1, "participants": 1, "indexes": 1}
        assert manager.get(cookie) is not None and manager.key_of_index(used.index) == used.key
    finally:
        store.close()


def test_the_new_indexes_are_made_on_an_existing_file(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the schema (and a session) of a file made before them
    old.execute("CREATE TABLE sessions (key TEXT PRIMARY KEY, data TEXT NOT NULL, created REAL NOT NULL, "
                "seen REAL NOT NULL)")
    old.execute("CREATE INDEX sessions_created ON sessions (created)")
    old.execute("INSERT INTO sessions VALUES ('old', ?, ?, ?)",
                ('{"identity": {"subject": "frank"}, "index": "_o"}', time.time(), time.time()))
    old.commit()
    old.close()
    store = SqliteStore(path)
    try:
        for query, index in (("SELECT rowid FROM sessions WHERE seen < 5 LIMIT 500", "sessions_seen"),
                             ("SELECT key FROM sessions WHERE json_extract(data, '$.identity.subject') = 'x' "
                              "ORDER BY created DESC", "sessions_subject")):
            plan = " ".join(str(row) for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert index in plan, plan
        manager = manager_on(store, max_per_user=1)
        manager.create(who("frank"))  # the session from before the index counts too
        assert store.get_session("old") is None
    finally:
        store.close()


def test_a_redis_session_expires_when_idle_with_its_rows(redis_server):
    redis_server.client().flushdb()
    store = RedisStore(redis_server.url, 3600)
    manager = manager_on(store, idle=2, absolute=3600)
    try:
        cookie, session = manager.create(who("gina"))
        manager.add_participant(session, "https://sp.example.test", {"name_id": "x"})
        names = [f"authgw:login:s:{session.key}", f"authgw:login:sp:{session.key}",
                 f"authgw:login:p:idx:{session.index}"]
        assert all(0 < store.redis.ttl(name) <= 3 for name in names), [store.redis.ttl(n) for n in names]
        time.sleep(1.2)
        assert manager.get(cookie) is not None  # a use: the idle time starts again, for every key
        manager.rechecked(session, None)  # an account check is no use: it keeps the expiry
        assert all(2 <= store.redis.ttl(name) <= 3 for name in names), [store.redis.ttl(n) for n in names]
        deadline = time.time() + 10
        while any(store.redis.exists(name) for name in names) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(store.redis.exists(name) for name in names)  # gone without any request
    finally:
        store.close()
