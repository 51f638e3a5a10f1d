"""Items left by stop 47 in the login door's SQLite session store (``plugins/login/sessions.py``).

- Every session write but the budgets' ran on the worker's event loop (the touch of a request
  carrying a session cookie, a park, a sign-in's session, a single-use take ...): with the
  store's write lock held elsewhere (an operator's ``sqlite3`` shell in ``BEGIN IMMEDIATE``, a
  backup), each waited up to ``BUSY_TIMEOUT`` (0.5 s) there and the worker answered nothing else
  meanwhile, ``/healthz`` and ``/auth`` included. They are now tried on the loop on a connection
  that never waits, and made again on the store's thread (bounded: ``STORE_WAIT``) when the lock
  is held, as the budgets are.

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

from gateway import Identity
from gateway.plugins.login.sessions import SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    base = tmp_path_factory.mktemp("left47b")
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
        site = LoginSite(base / "idp", slapd, CA.create())
        one_worker(site)
        try:
            yield site
        finally:
            site.stop()
    finally:
        slapd.stop()


def signed_in(site):
    browser = site.client()
    answer = site.sign_in(browser, "alice", "Alice-pw-1")
    assert answer.status_code == 200 and "Sign out" in answer.text, answer.text[:500]
    browser.headers["Connection"] = "close"
    return browser


def last_seen(site) -> list[float]:
    with sqlite3.connect(site.db) as db:
        return sorted(seen for (seen,) in db.execute("SELECT seen FROM sessions"))


def test_the_worker_answers_while_a_session_touch_waits_for_a_held_lock(door):
    browser = signed_in(door)
    before = last_seen(door)
    holder = held_lock(door)
    try:
        page = Pending(lambda: browser.get(f"{door.url}/login", timeout=25))  # its touch waits
        time.sleep(0.1)
        assert healthz(door).status_code == 200
        # Answered while the session's request waits: on the loop, the worker answered nothing
        # until the touch gave up (0.5 s), and the session's request got its 503 first.
        assert not page.done.is_set(), "the session's request was answered before /healthz: it did not wait"
        time.sleep(0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # the lock let go within the store's wait: the request is answered, its use written
    answer = page.result()
    assert answer.status_code == 200 and "Sign out" in answer.text, (answer.status_code, answer.text[:500])
    assert last_seen(door)[-1] > before[-1], "the touch was lost"


def test_a_lock_held_past_the_wait_is_the_503_and_the_session_lives_on(door):
    browser = signed_in(door)
    holder = held_lock(door)
    try:
        page = Pending(lambda: browser.get(f"{door.url}/login", timeout=25))
        time.sleep(0.1)
        assert healthz(door).status_code == 200
        assert not page.done.is_set(), "the session's request was answered before /healthz: it did not wait"
        answer = page.result()  # the lock still held: refused after the bounded wait
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer.status_code == 503 and answer.headers.get("Retry-After") == "5", answer.status_code
    output = door.gw.output()
    assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
    # the store back: the same cookie is the same session
    again = browser.get(f"{door.url}/login", timeout=25)
    assert again.status_code == 200 and "Sign out" in again.text, again.text[:500]


def test_a_sign_in_under_a_held_lock_waits_off_the_loop_and_is_made_once(door):
    browser = door.client()
    page = browser.get(f"{door.url}/login", timeout=15)
    from support.login import hidden

    form = {"csrf": hidden(page.text, "csrf"), "username": "alice", "password": "Alice-pw-1"}
    browser.headers["Connection"] = "close"
    count = len(last_seen(door))
    holder = held_lock(door)
    try:
        post = Pending(lambda: browser.post(f"{door.url}/login", data=form, timeout=25))
        time.sleep(0.3)  # the bind, then the session's writes wait for the lock
        assert healthz(door).status_code == 200
        assert not post.done.is_set(), "the sign-in was answered before /healthz: it did not wait"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    answer = post.result()
    assert answer.status_code == 200 and "Sign out" in answer.text, (answer.status_code, answer.text[:500])
    assert len(last_seen(door)) == count + 1  # one session, written once
    assert browser.get(f"{door.url}/login", timeout=25).text.count("Sign out") == 1


# -- the store itself, in one process ------------------------------------------------------------------

def manager_on(store: SqliteStore) -> SessionManager:
    return SessionManager(SessionSettings(), store, b"k" * 32)


ALICE = Identity(subject="alice", username="alice", method="ldap", authenticated_at=time.time())


def test_session_writes_waiting_for_the_lock_leave_the_loop_free_and_keep_single_use(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "STORE_WAIT", 20.0)  # generous: the lock is let go well before
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    manager = manager_on(store)

    async def main():
        cookie, session = await manager.acreate(ALICE)
        parked = await manager.apark({"r": 1}, 600)
        holder.execute("BEGIN IMMEDIATE")
        # a use, two takes of one parked request, a park, a sign-in: all wait for the lock
        waiting = [asyncio.ensure_future(c) for c in (
            manager.aget(cookie), manager.aunpark(parked), manager.aunpark(parked),
            manager.apark({"r": 2}, 600), manager.acreate(ALICE, cookie))]
        turns = 0
        while turns < 20:  # the loop goes round while they wait
            await asyncio.sleep(0.01)
            turns += 1
        assert not any(w.done() for w in waiting), "a write did not wait for the lock"
        # a read never waits for a writer (WAL): answered on the loop meanwhile
        assert manager.peek(parked) == {"r": 1}
        holder.execute("ROLLBACK")
        got, first, second, again, (new_cookie, new) = await asyncio.wait_for(asyncio.gather(*waiting), 15)
        assert got is not None and got.key == session.key
        assert sorted([first, second], key=str) == [None, {"r": 1}]  # single use: one take got it
        assert manager.peek(again) == {"r": 2}
        assert new.index == session.index  # the same subject's re-authentication keeps its index
        assert manager.get(cookie) is None and manager.get(new_cookie) is not None  # the old one ended

    try:
        asyncio.run(main())
    finally:
        holder.close()
        store.close()


def test_session_writes_queued_behind_a_held_lock_each_give_up_within_their_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "STORE_WAIT", 0.5)
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    holder = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    manager = manager_on(store)

    async def main():
        cookie, _ = await manager.acreate(ALICE)
        parked = await manager.apark({"r": 1}, 600)
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        results = await asyncio.gather(*(manager.aunpark(parked) for _ in range(20)), manager.aget(cookie),
                                       return_exceptions=True)
        took = time.monotonic() - started
        holder.execute("ROLLBACK")
        assert all(isinstance(r, sqlite3.OperationalError) and "locked" in str(r) for r in results), results
        assert took < 5.0, took  # a bound, not a benchmark: one wait for the queue, not 21 x 0.5 s
        assert await manager.aunpark(parked) == {"r": 1}  # nothing was taken by the refused ones
        assert await manager.aget(cookie) is not None

    try:
        asyncio.run(main())
    finally:
        holder.close()
        store.close()
