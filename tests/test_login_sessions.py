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
