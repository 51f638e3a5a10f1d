"""The throttle's refusals and ``/readyz``, and the SQLite store's checkpoint and the event loop
(items left by the review of the throttle's bounded WAL and Redis clock steps, 1b4e0e5).

* ``/readyz`` said ready while the throttle refused every password attempt: during the hold that
  follows a step of Redis's clock past the counters' margin (503), the next health probe's PING
  answered and readiness came back; while a reader kept the SQLite WAL past its bound (429), it
  never changed. A load balancer kept sending logins to an instance that refused them all. The
  probe now reports the store down, with the reason, while it refuses, and up once it clears.
* The checkpoint of a WAL a reader held back (``TRUNCATE`` past the bound, or the one SQLite
  makes at a commit once the reader let go) copied tens of MiB on the event loop: some 90 ms
  for 64 MiB, every request of the worker stalled. Such calls are now made on the store's
  threads (``StoreLocked``, as for a lock another process holds).

A real ``authgw serve``, real SQLite files and readers, a real redis-server whose clock is
stepped by the ``LD_PRELOAD`` library of tests/test_throttle_left46.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.gateway import static_users, write_conf
from support.net import wait_for
from test_throttle_left46 import SteppedRedis, boot_clock, step_library  # noqa: F401 - fixtures

from gateway.aio import in_loop_thread
from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle
from gateway.throttle_stores import SQLiteStore, StoreLocked, StoreUnavailable

CLIENT = "198.51.100.7"
MAX_WAL = SQLiteStore.MAX_WAL_BYTES  # the real bound: 64 MiB, some 2,400 guesses while a reader holds
FLOOD_CAP = 8000  # a flood goes no further than this, whatever happens


@pytest.fixture
def stepped_redis(tmp_path, step_library, monkeypatch):  # noqa: F811 - the fixture imported above
    redis = SteppedRedis(tmp_path / "stepped", step_library, monkeypatch)
    try:
        yield redis
    finally:
        redis.server.stop()


def pings(redis: SteppedRedis) -> int:
    """PING commands redis-server has run: the gateway's health probes."""
    return int(redis.server.client().info("commandstats").get("cmdstat_ping", {}).get("calls", 0))


def readyz(gw) -> tuple[int, dict]:
    answer = gw.get("/readyz")
    return answer.status, answer.json()


def throttle_component(body: dict) -> dict:
    (component,) = [c for c in body["components"] if c["name"] == "gateway.throttle_store"]
    return component


def wal_size(path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


class Reader:
    """A connection inside a read transaction (a backup, a ``sqlite3`` shell): SQLite cannot
    checkpoint the WAL past its snapshot while it lasts."""

    def __init__(self, path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN")
        self.db.execute("SELECT count(*) FROM failure").fetchone()

    def release(self) -> None:
        if self.db is not None:
            self.db.execute("COMMIT")
            self.db.close()
            self.db = None


# -- /readyz while Redis's clock step holds the store ------------------------------------------------

def test_readyz_is_false_while_a_step_of_redis_s_clock_holds_every_password_attempt(
        tmp_path, demo_hash, stepped_redis, start_gateway):
    window = 20
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "health": {"probe_interval": 1},
                                    "throttle": {"store": "redis", "window": window,
                                                 "redis": {"url": stepped_redis.server.url, "timeout": 2}}}),
        **static_users({"alice": demo_hash, "bob": demo_hash})})
    gw = start_gateway(directory)
    wait_for(lambda: readyz(gw)[0] == 200, what="/readyz ready", log=gw.output)
    assert gw.auth("alice", "wrong").status == 401  # the instance has seen the store's clock
    stepped_redis.step(86400)  # a day: past the counters' margin
    assert gw.auth("bob", "demo-password").status == 503
    # a whole probe round after the refusal: its PING, and the next round's
    seen = pings(stepped_redis)
    wait_for(lambda: pings(stepped_redis) >= seen + 2, what="a health probe round", log=gw.output)
    status, body = readyz(gw)
    assert status == 503, f"/readyz said ready while the throttle refuses every password attempt: {body}"
    assert body["reason"] == "gateway.throttle_store unavailable"
    component = throttle_component(body)
    assert component["ready"] is False and "jumped ahead" in component["detail"], component
    assert gw.auth("bob", "demo-password").status == 503  # what /readyz says
    assert gw.get("/healthz").status == 200  # the process is alive: no restart wanted
    # the hold lasts a window of the store's time; then ready again, without a login
    wait_for(lambda: readyz(gw)[0] == 200, timeout=window + 60, what="/readyz ready after the hold", log=gw.output)
    assert gw.auth("bob", "demo-password").status == 200
    assert "gateway.throttle_store is ready again" in gw.output()


def test_an_instance_that_made_no_attempt_is_not_ready_during_the_hold_either(stepped_redis, boot_clock):  # noqa: F811
    window = 60.0
    settings = ThrottleSettings(store="redis", user_failures=3, user_client_failures=3, client_failures=30,
                                window=window, redis={"url": stepped_redis.server.url, "timeout": 2})
    refusing, idle = Throttle(settings), Throttle(settings)  # idle: its load balancer sends it nothing now
    try:
        assert refusing.admit("alice", CLIENT) is not None
        assert idle.store.ping().endswith("answers")
        stepped_redis.step(86400)
        with pytest.raises(StoreUnavailable, match="held for a window"):
            refusing.admit("alice", CLIENT)
        with pytest.raises(StoreUnavailable, match="jumped ahead"):
            idle.store.ping()
        # Redis's clock set back meanwhile: the hold still ends a window after it began
        stepped_redis.step(-86400)
        with pytest.raises(StoreUnavailable, match="jumped ahead"):
            idle.store.ping()
        stepped_redis.step(window + 1)
        boot_clock[0] += window + 1
        assert idle.store.ping().endswith("answers")
        assert refusing.store.ping().endswith("answers")
    finally:
        refusing.close()
        idle.close()


# -- /readyz while the SQLite WAL is full ------------------------------------------------------------

def ballast(path, size: int) -> None:
    """Append *size* bytes to the store's WAL (while a reader holds it back), in a table of the
    test's own: what some 2,000 guesses at new names would write."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS test_ballast (b BLOB)")
        for _ in range(size // (1024 * 1024)):
            db.execute("INSERT INTO test_ballast VALUES (randomblob(1048576))")
    finally:
        db.close()


def test_readyz_is_false_while_a_reader_keeps_the_full_sqlite_wal_from_being_checkpointed(
        tmp_path, demo_hash, start_gateway):
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "health": {"probe_interval": 1},
                                    "trusted_proxies": ["127.0.0.1/32"], "failure_timing": {"enabled": False},
                                    "throttle": {"store": "sqlite", "window": 600}}),
        **static_users({"alice": demo_hash})})
    gw = start_gateway(directory)
    wait_for(lambda: readyz(gw)[0] == 200, what="/readyz ready", log=gw.output)
    path = gw.state_dir / "throttle.sqlite3"
    assert gw.auth("alice", "wrong").status == 401

    def spray(i: int) -> int:  # a new name from a new address: counted, never throttled by its keys
        return gw.auth(f"spray-{i}", "guess", {"X-Forwarded-For": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}).status

    reader = Reader(path)
    try:
        # Most of the WAL written at once (each guess reaches the chain, whose hashing of an
        # unknown name costs some 30 ms: 2,400 of them took 90 s here); the guesses take it past
        # its bound, through the gateway's own writes.
        ballast(path, MAX_WAL - 4 * 1024 * 1024)
        statuses: list[int] = []
        with ThreadPoolExecutor(8) as pool:
            while 429 not in statuses and len(statuses) < 2000:
                statuses += pool.map(spray, range(len(statuses), len(statuses) + 50))
        assert 429 in statuses, f"{len(statuses)} guesses, WAL {wal_size(path)} bytes: none refused"
        assert set(statuses) <= {401, 429}, sorted(set(statuses))
        assert wal_size(path) > MAX_WAL
        assert gw.auth("alice", "demo-password").status == 429  # every password attempt refused

        def unready():
            status, body = readyz(gw)
            return status == 503 and body

        body = wait_for(unready, timeout=30, what="/readyz not ready while the WAL is full", log=gw.output)
        assert body["reason"] == "gateway.throttle_store unavailable"
        component = throttle_component(body)
        assert "WAL" in component["detail"] and "reader" in component["detail"], component
        assert gw.get("/healthz").status == 200
    finally:
        reader.release()
    # the reader let go: the probe checkpoints the WAL, with no login needed (none come while unready)
    wait_for(lambda: readyz(gw)[0] == 200, timeout=30, what="/readyz ready once the reader let go", log=gw.output)
    assert wal_size(path) <= MAX_WAL
    assert gw.auth("alice", "demo-password").status == 200
    assert "gateway.throttle_store is ready again" in gw.output()


# -- the checkpoint of a held-back WAL, off the event loop --------------------------------------------

@pytest.fixture
def sqlite_throttle(tmp_path):
    settings = ThrottleSettings(store="sqlite", user_failures=3, user_client_failures=3, client_failures=30,
                                window=600)
    throttle = Throttle(settings, state_dir=tmp_path, workers=2)
    assert throttle.kind == "sqlite"
    yield throttle
    throttle.close()


def held_back_wal(throttle: Throttle, path, size: int) -> None:
    """Grow the WAL past *size* with a reader holding a snapshot (bounded), then let it go."""
    throttle.admit("first", CLIENT)
    reader = Reader(path)
    try:
        i = 0
        while wal_size(path) <= size and i < FLOOD_CAP:
            throttle.admit(f"spray-{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")  # off the loop
            i += 1
        assert wal_size(path) > size, f"{i} guesses grew the WAL to {wal_size(path)} bytes only"
    finally:
        reader.release()


@pytest.fixture
def checkpoints(monkeypatch):
    """Whether each TRUNCATE checkpoint of the store was made on an event loop's thread."""
    made: list[bool] = []
    real = SQLiteStore._checkpoint

    def checkpoint(db):
        made.append(in_loop_thread())
        return real(db)

    monkeypatch.setattr(SQLiteStore, "_checkpoint", staticmethod(checkpoint))
    return made


def on_the_loop(call):
    async def run():
        return call()
    return asyncio.run(run())


def test_the_truncate_checkpoint_of_a_full_wal_is_not_made_on_the_event_loop(tmp_path, sqlite_throttle, checkpoints):
    path = tmp_path / "throttle.sqlite3"
    held_back_wal(sqlite_throttle, path, MAX_WAL)
    checkpoints.clear()  # those the flood tried (off the loop) while the reader held
    sqlite_throttle.store._checkpoint_tried = None  # the reader let go: one is due now
    with pytest.raises(StoreLocked):  # the chain makes the call again on a store thread
        on_the_loop(lambda: sqlite_throttle.admit("victim", CLIENT))
    assert checkpoints == [], "a checkpoint of a 64 MiB WAL was made on the event loop"
    assert wal_size(path) > MAX_WAL
    # on the store's thread: checkpointed, and the reservation made (fail closed only while full)
    assert sqlite_throttle.admit("victim", CLIENT) is not None
    assert checkpoints == [False]
    assert wal_size(path) <= MAX_WAL
    assert on_the_loop(lambda: sqlite_throttle.admit("victim", CLIENT)) is not None  # back on the loop


def test_the_commit_s_checkpoint_of_a_held_back_wal_is_not_made_on_the_event_loop(tmp_path, sqlite_throttle):
    path = tmp_path / "throttle.sqlite3"
    held_back_wal(sqlite_throttle, path, MAX_WAL // 2)  # under the bound: no TRUNCATE, and not full
    with pytest.raises(StoreLocked):  # its commit would copy 32 MiB into the file on the loop
        on_the_loop(lambda: sqlite_throttle.admit("victim", CLIENT))
    assert sqlite_throttle.admit("victim", CLIENT) is not None  # on the store's thread
    assert sqlite_throttle.store.ping().endswith("answers")
