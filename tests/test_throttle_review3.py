"""The throttle's SQLite store and the wall clock (third review of the throttle).

The SQLite store (``store: sqlite``, what ``auto`` is with several workers) dated its failures by
``time.time()``: a wall-clock step forward of a window (a slow clock corrected by NTP) freed every
guess at once, and a step back (an RTC or NTP correction of hours) kept every user it had
throttled refused for those hours, however short the window. The store now dates them by the
boot clock, shared by the machine's processes, offset to the wall clock once per boot.

The Redis store dates failures by Redis's ``TIME``: a Redis host whose clock stepped back kept
the failures counted before the step for the step's length. A failure dated after Redis's now is
dated now by the reservation script, so it lasts a window more at most.

The real ``Throttle`` over a real SQLite file and a real redis-server; only the wall clock (the
throttle's ``clock``, what it reads ``time.time`` for) and, for a reboot, the boot clock are
stood in for: the system clock cannot be stepped under a test. Redis's failures dated before a
step back are written as a clock three hours ahead wrote them.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from support.gateway import static_users, write_conf
from support.redis import RedisServer

from gateway.model import Outcome
from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle
from gateway.throttle_stores import SQLiteStore

CLIENT = "198.51.100.7"


@pytest.fixture
def redis(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


def sqlite_throttle(state_dir, wall, *, window: float, limit: int = 3) -> Throttle:
    settings = ThrottleSettings(store="sqlite", user_failures=limit, user_client_failures=limit, window=window)
    throttle = Throttle(settings, state_dir=state_dir, workers=2, clock=lambda: wall[0])
    assert throttle.kind == "sqlite"
    return throttle


def guess(throttle: Throttle, user: str = "alice") -> bool:
    """One wrong password: whether it was let through to the chain."""
    ticket = throttle.admit(user, CLIENT)
    if ticket is None:
        return False
    throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
    return True


def test_a_wall_clock_step_forward_frees_no_guess_of_the_sqlite_store(tmp_path):
    wall = [time.time()]
    throttle = sqlite_throttle(tmp_path, wall, window=600)
    try:
        assert [guess(throttle) for _ in range(4)] == [True, True, True, False]
        wall[0] += 601  # the wall clock stepped a window forward; no time passed
        assert not guess(throttle), "a wall-clock step freed the guesses of a throttled user"
        wall[0] += 30 * 86400
        assert not guess(throttle)
        # a second worker's throttle on the same file, built after the step, counts the same
        other = sqlite_throttle(tmp_path, wall, window=600)
        try:
            assert not guess(other)
        finally:
            other.close()
    finally:
        throttle.close()


def test_a_wall_clock_step_back_keeps_nobody_throttled_past_the_window(tmp_path):
    """Dated by the wall clock, failures counted before a step back of 3 h stayed "in the future"
    until the clock caught up: the user stayed refused 3 h past the window. The store's time is
    the boot clock's (stepped here by hand: a window passes, the wall clock goes back 3 h)."""
    boot = ["boot-1", 50_000.0]
    store = SQLiteStore(tmp_path / "throttle.sqlite3", boot_clock=lambda: tuple(boot))
    wall = time.time()
    alice, bob = [("alice", 3)], [("bob", 3)]
    try:
        assert [store.reserve(alice, f"t{i}", wall, 600) for i in range(4)] == [True, True, True, False]
        wall -= 3 * 3600  # the wall clock stepped three hours back
        boot[1] += 599
        assert not store.reserve(alice, "t4", wall, 600), "still within the window"
        boot[1] += 2  # the window has passed
        assert store.reserve(alice, "t5", wall, 600), "a wall-clock step back kept a throttled user refused"
        assert store.reserve(bob, "t6", wall, 600)  # and others as ever
    finally:
        store.close()


def test_the_sqlite_store_goes_on_from_its_failures_after_a_reboot_whose_clock_is_behind(tmp_path):
    """A reboot: the boot clock starts again; the store's time goes on from the wall clock, or
    from its latest failure when the wall clock is behind it (an RTC that lost time), so the
    counts of the last boot still hold for the rest of their window."""
    path = tmp_path / "throttle.sqlite3"
    boot = ["boot-1", 50_000.0]
    store = SQLiteStore(path, boot_clock=lambda: tuple(boot))
    wall = time.time()
    keys = [("ukey", 3)]
    try:
        assert [store.reserve(keys, f"t{i}", wall, 600) for i in range(4)] == [True, True, True, False]
        # the machine reboots; its wall clock reads a day behind the failures
        boot[:] = ["boot-2", 5.0]
        again = SQLiteStore(path, boot_clock=lambda: tuple(boot))
        try:
            assert not again.reserve(keys, "t4", wall - 86400, 600), "a reboot freed the guesses"
            boot[1] += 601  # a window of this boot passes (whatever the wall clock says)
            assert again.reserve(keys, "t5", wall - 86400, 600)
        finally:
            again.close()
    finally:
        store.close()


def test_the_boot_clock_is_this_machines():
    from gateway.throttle_stores import _boot_clock

    boot, first = _boot_clock()
    assert boot is not None, "on Linux the boot id is known: the store does not fall back to the wall clock"
    assert _boot_clock()[1] >= first


def test_failures_redis_counted_before_its_clock_stepped_back_last_a_window_at_most(redis):
    settings = ThrottleSettings(store="redis", user_failures=3, user_client_failures=3, window=1.0,
                                redis={"url": redis.url})
    throttle = Throttle(settings)
    client = redis.client()
    try:
        ticket = throttle.ticket("alice", CLIENT)
        seconds, micros = client.time()
        ahead = seconds * 1000 + micros // 1000 + 3 * 3600 * 1000  # Redis's clock was 3 h ahead then
        prefix = settings.redis.key_prefix
        for key in (ticket.user, ticket.pair, ticket.client):
            client.zadd(prefix + key, {f"before-the-step-{i}": ahead for i in range(3)})
            client.pexpire(prefix + key, 4 * 3600 * 1000)
        assert not guess(throttle), "three failures: throttled"
        end = time.monotonic() + 15
        freed = False
        while not freed and time.monotonic() < end:
            time.sleep(0.25)
            freed = guess(throttle)
        assert freed, "failures dated before Redis's clock stepped back kept the user refused past the window"
    finally:
        throttle.close()


def test_the_workers_of_a_gateway_date_failures_by_one_boot_clock(tmp_path, demo_hash, start_gateway):
    """Two real workers share the store's clock: one ``clock`` row for this boot, and every
    failure dated on it (the boot clock plus the row's offset), whichever worker counted it."""
    from gateway.throttle_stores import _boot_clock

    # deadline 30: what is counted here is when, not how fast; on a machine loaded by two runs of
    # the suite side by side (six test workers and their servers on two cores) one guess in twelve
    # was answered 503 within the default 5 s (the gateway's log was not kept)
    core = {"chain": ["static"], "workers": 2, "trusted_proxies": ["127.0.0.1/32"], "deadline": 30,
            "throttle": {"user_failures": 50, "user_client_failures": 50, "client_failures": 50, "window": 600}}
    gw = start_gateway(write_conf(tmp_path / "c", {"gateway.yaml": json.dumps(core),
                                                   **static_users({"bob": demo_hash})}), workers=2)
    boot, before = _boot_clock()
    statuses = [gw.auth("bob", f"guess-{i}", {"X-Forwarded-For": f"192.0.2.{i}"}).status for i in range(12)]
    after = _boot_clock()[1]
    assert statuses == [401] * 12, (statuses, gw.output()[-3000:])
    db = sqlite3.connect(gw.state_dir / "throttle.sqlite3")
    try:
        assert db.execute("SELECT boot FROM clock").fetchall() == [(boot,)]
        (offset,) = db.execute("SELECT offset FROM clock").fetchone()
        times = [at for (at,) in db.execute("SELECT at FROM failure")]
    finally:
        db.close()
    assert len(times) == 12 * 3
    assert all(offset + before <= at <= offset + after for at in times), (offset, before, after, times)
