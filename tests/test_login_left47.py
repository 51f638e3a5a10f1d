"""Items left by stop 46 in the login door's shared budgets (``plugins/login/sessions.py``).

- The SQLite store's budget check (``take_token``) ran on the worker's event loop: with the
  store's write lock held elsewhere (an operator's ``sqlite3`` shell in ``BEGIN IMMEDIATE``, a
  sibling worker in a long write), a request that parks waited up to 0.5 s there, then got the
  503, and the worker answered nothing else meanwhile (``/healthz``, ``/auth``). The check now
  waits off the loop, on the store's budget thread (bounded: ``BUDGET_WAIT``), then 503.

Real ``authgw serve`` (one worker: the requests share its loop) in front of a real slapd, the lock
held by a real SQLite connection of the test.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd
from support.heldlock import Pending, healthz, held_lock, one_worker

from gateway.plugins.login.sessions import SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings

REDIRECT = "https://app.example.test/cb"
CLIENT = {"client_id": "app", "redirect_uri": REDIRECT, "response_type": "code",
          "scope": "openid", "code_challenge": "a" * 43, "code_challenge_method": "S256"}


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    base = tmp_path_factory.mktemp("left47")
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
        site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                         login={"oidc": {"clients": [{"client_id": "app", "redirect_uris": [REDIRECT],
                                                      "client_secret": {"env": "APP_SECRET"}}]}},
                         env={"APP_SECRET": "s3cret-s3cret-s3cret"})
        one_worker(site)
        try:
            yield site
        finally:
            site.stop()
    finally:
        slapd.stop()


def authorize(site, address: str, state: str):
    browser = site.client()
    browser.headers["Connection"] = "close"
    return browser.get(f"{site.gw.url}/oidc/authorize", params={**CLIENT, "state": state},
                       headers={"X-Forwarded-For": address}, allow_redirects=False, timeout=25)


def test_the_worker_answers_while_a_budget_check_waits_for_a_held_lock(door):
    assert authorize(door, "203.0.113.50", "warm").headers["Location"].startswith("/login?req=")
    holder = held_lock(door)
    try:
        login = Pending(lambda: authorize(door, "203.0.113.51", "waits"))
        time.sleep(0.3)  # the request reaches its budget check and waits for the lock
        assert healthz(door).status_code == 200
        # Answered while the login request waits: on the loop, the worker answered nothing until
        # the check gave up (0.5 s), and the login request got its 503 first.
        assert not login.done.is_set(), "the login request was answered before /healthz: it did not wait"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # the lock let go within the check's wait: the request is served (parked), not refused
    answer = login.result()
    assert answer.status_code == 303 and answer.headers["Location"].startswith("/login?req="), \
        (answer.status_code, answer.headers)


def test_a_lock_held_past_the_wait_is_the_503_and_the_worker_answered_meanwhile(door):
    holder = held_lock(door)
    try:
        login = Pending(lambda: authorize(door, "203.0.113.52", "refused"))
        time.sleep(0.3)
        assert healthz(door).status_code == 200
        assert not login.done.is_set(), "the login request was answered before /healthz: it did not wait"
        answer = login.result()  # the lock still held: refused after the bounded wait
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # OIDC tells the relying party at its redirect_uri (RFC 6749 4.1.2.1), nothing parked
    assert answer.headers["Location"].startswith(REDIRECT) and "error=temporarily_unavailable" in \
        answer.headers["Location"], (answer.status_code, answer.headers)
    output = door.gw.output()
    assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
    # the store back: the same address parks (its token was not spent by the refused request)
    assert authorize(door, "203.0.113.52", "after").headers["Location"].startswith("/login?req=")


def test_token_endpoint_under_a_held_lock_is_503_and_a_right_secret_spends_nothing(door):
    def token(secret: str):
        browser = door.client()
        browser.headers["Connection"] = "close"
        return browser.post(f"{door.gw.url}/oidc/token", auth=("app", secret),
                            data={"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT},
                            headers={"X-Forwarded-For": "203.0.113.53"}, timeout=25)

    holder = held_lock(door)
    try:
        answer = token("wrong")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer.status_code == 503 and answer.json() == {"error": "temporarily_unavailable"}, answer.text
    # the give-back, off the loop too: right secrets spend nothing (40 is past the budget of 30)
    assert all(token("s3cret-s3cret-s3cret").status_code == 400 for _ in range(40))


# -- the store itself, in one process ------------------------------------------------------------------

def manager_on(store: SqliteStore) -> SessionManager:
    return SessionManager(SessionSettings(), store, b"k" * 32)


def test_a_budget_check_waiting_for_the_lock_leaves_the_event_loop_free(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "BUDGET_WAIT", 20.0)  # generous: the lock is let go well before
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    manager = manager_on(store)

    async def main():
        holder.execute("BEGIN IMMEDIATE")
        check = asyncio.ensure_future(manager.take_token("park", "203.0.113.60", 2, 1.0))
        turns = 0
        while turns < 20:  # the loop goes round while the check waits
            await asyncio.sleep(0.01)
            turns += 1
        assert not check.done(), "the check did not wait for the lock"
        holder.execute("ROLLBACK")
        assert await asyncio.wait_for(check, 15) == 0.0
        assert await manager.take_token("park", "203.0.113.60", 2, 1.0) == 0.0
        assert await manager.take_token("park", "203.0.113.60", 2, 1.0) > 0  # the burst spent: 2
        await manager.give_back_token("park", "203.0.113.60", 2, 1.0)
        assert await manager.take_token("park", "203.0.113.60", 2, 1.0) == 0.0

    try:
        asyncio.run(main())
    finally:
        holder.close()
        store.close()


def test_budget_checks_queued_behind_a_held_lock_each_give_up_within_their_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "BUDGET_WAIT", 0.5)
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    manager = manager_on(store)

    async def main():
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        results = await asyncio.gather(*(manager.take_token("park", f"203.0.113.{n}", 2, 1.0) for n in range(20)),
                                       return_exceptions=True)
        took = time.monotonic() - started
        holder.execute("ROLLBACK")
        assert all(isinstance(r, sqlite3.OperationalError) and "locked" in str(r) for r in results), results
        # a bound, not a benchmark: one wait for the queue, not one per check (20 x 0.5 s)
        assert took < 5.0, took
        assert await manager.take_token("park", "203.0.113.1", 2, 1.0) == 0.0  # nothing was spent

    try:
        asyncio.run(main())
    finally:
        holder.close()
        store.close()


# -- the Redis budgets when Redis's clock steps ------------------------------------------------------------

#: The budgets' buckets on a real redis-server whose wall clock (``TIME``, key expiry) the small
#: ``LD_PRELOAD`` library of test_throttle_left46 steps. A step forward refilled every bucket
#: (their time and their keys' expiry are Redis's clock): one more burst of guesses per step; a
#: step back left every spent bucket empty for its length.
from test_throttle_left46 import SteppedRedis, step_library  # noqa: E402,F401 - the fixture is used by name

from gateway.plugins.login.sessions import STORE_ERRORS, RedisStore  # noqa: E402

BURST, RATE = 3, 1.0  # a token a second: time passing is seen within the test


@pytest.fixture
def stepped_redis(tmp_path, step_library, monkeypatch):  # noqa: F811 - step_library is the imported fixture
    redis = SteppedRedis(tmp_path / "stepped", step_library, monkeypatch)
    try:
        yield redis
    finally:
        redis.server.stop()


def spend_all(store: RedisStore, key: str) -> None:
    assert [store.take_token(key, BURST, RATE, 0.0) for _ in range(BURST)] == [0.0] * BURST
    assert store.take_token(key, BURST, RATE, 0.0) > 0


def test_a_step_of_redis_s_clock_forward_refills_no_budget(stepped_redis):
    store = RedisStore(stepped_redis.server.url, 3600, timeout=2)
    try:
        spend_all(store, "guesser")
        stepped_redis.step(120)  # within the keys' margin: no key expired, the step is taken out
        assert store.take_token("guesser", BURST, RATE, 0.0) > 0, "a step of Redis's clock refilled the bucket"
        other = RedisStore(stepped_redis.server.url, 3600, timeout=2)  # an instance started after the step
        try:
            assert other.take_token("guesser", BURST, RATE, 0.0) > 0, "the corrected time is not shared"
            assert other.take_token("fresh", BURST, RATE, 0.0) == 0.0
        finally:
            other.close()
        time.sleep(1.5 / RATE)  # time still refills: one token, not a burst
        assert store.take_token("guesser", BURST, RATE, 0.0) == 0.0
        assert store.take_token("guesser", BURST, RATE, 0.0) > 0
    finally:
        store.close()


def test_a_step_past_the_keys_margin_holds_the_budgets_for_a_refill(stepped_redis):
    store = RedisStore(stepped_redis.server.url, 3600, timeout=2)
    try:
        spend_all(store, "guesser")
        stepped_redis.step(3600)  # keys may have expired early: the bucket cannot be trusted
        with pytest.raises(STORE_ERRORS, match="jumped ahead"):  # the door's 503, not a full bucket
            store.take_token("guesser", BURST, RATE, 0.0)
        deadline = time.monotonic() + 15
        while True:  # held for one refill (BURST / RATE seconds), then answered again
            try:
                store.take_token("other", BURST, RATE, 0.0)
                break
            except STORE_ERRORS:
                assert time.monotonic() < deadline, "the hold never ended"
                time.sleep(0.2)
    finally:
        store.close()


def test_a_step_of_redis_s_clock_back_leaves_no_budget_empty(stepped_redis):
    store = RedisStore(stepped_redis.server.url, 3600, timeout=2)
    try:
        spend_all(store, "user")
        stepped_redis.step(-3600)
        # The first check after the step dates the bucket anew (its refill starts then: a refill's
        # time lost at most, as the throttle's counts last a window more at most), and time refills it.
        assert 0 < store.take_token("user", BURST, RATE, 0.0) <= 1 / RATE
        time.sleep(1.5 / RATE)
        assert store.take_token("user", BURST, RATE, 0.0) == 0.0, "a step back froze the bucket for its length"
        store.give_back_token("user", BURST, RATE, 0.0)
        assert store.take_token("user", BURST, RATE, 0.0) == 0.0  # the token given back
    finally:
        store.close()
