"""Parked requests are bounded (review: an unauthenticated flood of /oidc/authorize grew the
session file by gigabytes, and its purge froze the worker for seconds).

End to end, through a real ``authgw serve`` with the login door: a burst of protocol requests
from one client address is answered 429 (``login.too_many_requests``) once its budget is spent,
nothing more is parked for it, and another address is still served; the address is the one the
door computes (a trusted proxy's ``X-Forwarded-For`` on the main listener, the socket peer on the
door's own TLS listener). On the store: the ``pending(expires)`` index, the purge in bounded
batches on a connection of its own, off the event loop, the space given back, and the total
bound (503, ``login.too_many_pending``). No assertion depends on how fast anything runs."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from gateway.plugins.login.sessions import RedisStore, SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd

CLIENT = {"client_id": "app", "redirect_uri": "https://app.example.test/cb", "response_type": "code",
          "scope": "openid", "code_challenge": "a" * 43, "code_challenge_method": "S256", "state": "s" * 200}
#: More requests than the budget (30) and what it can refill while they are sent, on any machine
#: that answers a request in under a second.
FLOOD = 200


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    base = tmp_path_factory.mktemp("parklimits")
    slapd = Slapd(base / "slapd").start()
    site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]}, login={
        "oidc": {"clients": [{"client_id": "app", "redirect_uris": ["https://app.example.test/cb"],
                              "client_secret": {"env": "APP_SECRET"}}]}},
        env={"APP_SECRET": "s3cret-s3cret-s3cret"})
    site.gw = site.start()
    yield site
    site.stop()
    slapd.stop()


def parked(site) -> int:
    path = site.dir / "state0" / "login" / "sessions.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM pending WHERE key LIKE 'p:%'").fetchone()[0]
    finally:
        db.close()


def flood(session, url: str, headers: dict | None = None) -> tuple[int, object]:
    """GET /oidc/authorize until the first refusal: the number of requests parked before it, and it."""
    for served in range(FLOOD):
        answer = session.get(f"{url}/oidc/authorize", params=CLIENT, headers=headers or {}, allow_redirects=False,
                             timeout=15)
        if not answer.headers.get("Location", "").startswith("/login?req="):
            return served, answer
    pytest.fail(f"{FLOOD} requests from one address were all parked")


def assert_too_many(answer) -> None:
    """The refusal of a validated OIDC request: told at its redirect_uri (RFC 6749 section
    4.1.2.1), nothing parked."""
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    assert answer.headers["Location"].startswith(CLIENT["redirect_uri"] + "?error=temporarily_unavailable&")
    assert answer.headers["X-Refused-Reason"] == "login.too_many_requests"
    assert int(answer.headers["Retry-After"]) >= 1
    assert answer.headers["Cache-Control"] == "no-store"


def test_a_burst_from_one_forwarded_address_is_refused_and_another_is_served(door):
    browser = door.client()
    before = parked(door)
    served, answer = flood(browser, door.gw.url, {"X-Forwarded-For": "203.0.113.7"})
    assert served >= 30  # the burst a person never reaches is served whole
    assert_too_many(answer)
    assert parked(door) == before + served  # the refused request parked nothing
    # A POST to /oidc/authorize parks through another path: refused for the same address too.
    posted = browser.post(f"{door.gw.url}/oidc/authorize", data=CLIENT, headers={"X-Forwarded-For": "203.0.113.7"},
                          allow_redirects=False, timeout=15)
    assert_too_many(posted)
    assert parked(door) == before + served
    # Another client behind the same trusted proxy has its own budget.
    other = browser.get(f"{door.gw.url}/oidc/authorize", params=CLIENT, headers={"X-Forwarded-For": "203.0.113.8"},
                        allow_redirects=False, timeout=15)
    assert other.status_code == 303 and other.headers["Location"].startswith("/login?req=")
    # The door's own TLS listener: the proxy's clients' budgets are not the socket peer's.
    direct = door.client().get(f"{door.url}/oidc/authorize", params=CLIENT, allow_redirects=False, timeout=15)
    assert direct.status_code == 303
    assert "login.too_many_requests" in door.gw.output()


def test_a_forwarded_header_on_the_tls_listener_does_not_buy_a_new_budget(door):
    """On the door's TLS listener no peer is a proxy: a client that makes up X-Forwarded-For
    values is still one address."""
    browser = door.client()
    headers = iter(f"198.51.100.{n % 250}" for n in range(10 * FLOOD))
    served = 0
    for served in range(FLOOD):
        answer = browser.get(f"{door.url}/oidc/authorize", params=CLIENT, allow_redirects=False, timeout=15,
                             headers={"X-Forwarded-For": next(headers)})
        if not answer.headers.get("Location", "").startswith("/login?req="):
            break
    else:
        pytest.fail("every request with a new X-Forwarded-For was parked")
    assert_too_many(answer)
    # The main listener's trusted proxy, with a client of its own, is still served.
    other = browser.get(f"{door.gw.url}/oidc/authorize", params=CLIENT, headers={"X-Forwarded-For": "203.0.113.9"},
                        allow_redirects=False, timeout=15)
    assert other.status_code == 303


def test_failed_client_authentications_at_the_token_endpoint_spend_the_addresses_budget(door):
    """A client secret was guessed at /oidc/token without limit and without a log line (review:
    2,000 guesses in 2 s, all 401, nothing logged). Failed client authentications now spend a
    budget per client address; past it the answer is 429 before any secret is compared (the
    right one is not told either), and another address is served."""
    url, forwarded = f"{door.gw.url}/oidc/token", {"X-Forwarded-For": "203.0.113.50"}
    body = {"grant_type": "authorization_code", "code": "no-such-code", "redirect_uri": "https://app.example.test/cb",
            "code_verifier": "v" * 43}
    browser = door.client()
    failed = 0
    for failed in range(FLOOD):
        answer = browser.post(url, data=body, auth=("app", f"guess-{failed}"), headers=forwarded, timeout=15)
        if answer.status_code != 401:
            break
        assert answer.json()["error"] == "invalid_client"
    else:
        pytest.fail(f"{FLOOD} failed client authentications from one address were all answered 401")
    assert failed >= 30
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    right = browser.post(url, data=body, auth=("app", "s3cret-s3cret-s3cret"), headers=forwarded, timeout=15)
    assert right.status_code == 429  # past the budget, right or wrong is not told
    other = browser.post(url, data=body, auth=("app", "s3cret-s3cret-s3cret"),
                         headers={"X-Forwarded-For": "203.0.113.51"}, timeout=15)
    assert (other.status_code, other.json()["error"]) == (400, "invalid_grant")  # authenticated; no such code
    output = door.gw.output()
    assert "reason=oidc.invalid_client client_id=app client=203.0.113.50" in output
    assert output.count("reason=oidc.too_many_client_failures client=203.0.113.50") == 1  # once, not per request
    assert "too many failed client authentications" not in output  # nor a line per refused request
    assert "guess-" not in output and "s3cret" not in output


# -- the store ----------------------------------------------------------------------------------


def manager_for(store) -> SessionManager:
    return SessionManager(SessionSettings(), store, b"k" * 32)


def rows(store, like: str = "%") -> int:
    return store.db.execute("SELECT COUNT(*) FROM pending WHERE key LIKE ?", (like,)).fetchone()[0]


def test_the_expires_index_is_made_on_a_new_and_on_an_existing_file(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the schema of a file made before the index
    old.execute("CREATE TABLE pending (key TEXT PRIMARY KEY, data TEXT NOT NULL, expires REAL NOT NULL)")
    old.execute("INSERT INTO pending VALUES ('p:x', '{}', 1.0)")
    old.commit()
    old.close()
    for store in (SqliteStore(path), SqliteStore(tmp_path / "new.sqlite3")):
        try:
            indexed = [store.db.execute(f"PRAGMA index_info({name!r})").fetchall()
                       for _, name, *_ in store.db.execute("PRAGMA index_list(pending)")]
            assert any(info and info[0][2] == "expires" for info in indexed)
            plan = " ".join(str(r) for r in store.db.execute(
                "EXPLAIN QUERY PLAN SELECT rowid FROM pending WHERE expires < 5 LIMIT 500"))
            assert "expires" in plan and "SCAN pending" not in plan, plan
        finally:
            store.close()


def test_the_purge_deletes_in_bounded_batches_on_its_own_connection(tmp_path, monkeypatch):
    from gateway.plugins.login import sessions

    store = SqliteStore(tmp_path / "sessions.sqlite3")
    try:
        for n in range(1234):
            store.put_pending(f"p:old{n}", {"n": n}, 100.0)
        for n in range(7):
            store.put_pending(f"p:live{n}", {"n": n}, 10_000.0)
        statements: list[str] = []
        store.db.set_trace_callback(lambda s: statements.append("main " + s))
        opened = sessions.connect_wal

        def traced(*args, **kw):
            conn = opened(*args, **kw)
            conn.set_trace_callback(lambda s: statements.append("purge " + s))
            return conn

        monkeypatch.setattr(sessions, "connect_wal", traced)
        store.purge(1000.0, 0.0)
        deletes = [s for s in statements if "DELETE FROM pending" in s]
        assert deletes and all(s.startswith("purge ") and "LIMIT" in s for s in deletes)
        assert len(deletes) == 1234 // sessions.PURGE_BATCH + 1
        assert rows(store) == 7 and rows(store, "p:live%") == 7
    finally:
        store.close()


def test_the_purge_runs_off_the_event_loop_and_parking_goes_on_meanwhile(tmp_path):
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    manager = manager_for(store)
    started, release = threading.Event(), threading.Event()
    purged_in: list[int] = []
    real_purge = store.purge

    def slow_purge(now, oldest):
        purged_in.append(threading.get_ident())
        started.set()
        assert release.wait(30)
        return real_purge(now, oldest)

    store.purge = slow_purge

    async def scenario():
        loop_thread = threading.get_ident()
        first = manager.park({"r": 1}, 600)  # the first park starts the purge, and does not wait for it
        assert await asyncio.to_thread(started.wait, 30)
        assert purged_in and purged_in[0] != loop_thread
        later = [manager.park({"r": n}, 600) for n in range(5)]  # the loop is free while it runs
        release.set()
        await manager._purging
        return first, later

    try:
        first, later = asyncio.run(scenario())
        assert manager.peek(first) == {"r": 1} and all(manager.peek(k) is not None for k in later)
    finally:
        release.set()
        store.close()


def test_space_is_given_back_after_a_large_purge(tmp_path):
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    try:
        assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, on a new file
        for n in range(2000):
            store.put_pending(f"p:{n}", {"state": "x" * 6000}, 100.0)
        full = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.purge(1000.0, 0.0)
        assert rows(store) == 0
        left = store.db.execute("PRAGMA page_count").fetchone()[0]
        assert left < full // 10, (full, left)
        assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, redis_server):
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "sessions.sqlite3")
    else:
        redis_server.client().flushdb()
        made = RedisStore(redis_server.url, 3600)
    yield made
    made.close()


def test_beyond_the_total_bound_nothing_is_parked(store):
    from gateway.plugins.login.sessions import ParkRefused

    manager = manager_for(store)
    manager.max_parked = 40
    keys = [manager.park({"r": n}, 600) for n in range(40)]
    with pytest.raises(ParkRefused) as refused:
        manager.park({"r": "over"}, 600)
    assert (refused.value.status, refused.value.reason) == (503, "login.too_many_pending")
    assert refused.value.retry_after >= 1
    assert store.count_parked(0.0) == 40
    # Other short-lived records (replay ids, codes) are not parked requests: not refused.
    assert manager.first_use("saml", "some-id", 600)
    # Parked requests that are used free their place (the count is made again at the next park).
    for key in keys[:10]:
        assert manager.unpark(key) is not None
    manager._counted_at = 0.0
    assert manager.peek(manager.park({"r": "again"}, 600)) == {"r": "again"}


def test_the_budget_per_client_is_a_setting(tmp_path):
    """``login.sessions.requests_per_client``: a site behind one NAT raises it; here one lowered."""
    slapd = Slapd(tmp_path / "slapd").start()
    try:
        site = LoginSite(tmp_path / "idp", slapd, CA.create(), login={
            "sessions": {"requests_per_client": 3},
            "oidc": {"clients": [{"client_id": "app", "redirect_uris": ["https://app.example.test/cb"],
                                  "client_secret": {"env": "APP_SECRET"}}]}},
            env={"APP_SECRET": "s3cret-s3cret-s3cret"})
        site.gw = site.start()
        served, answer = flood(site.client(), site.url)
        assert 3 <= served < 6  # the burst, and what a second or two refills at 3 a minute
        assert_too_many(answer)
    finally:
        if "site" in locals():
            site.stop()
        slapd.stop()


def test_the_session_purge_is_found_by_an_index_too(tmp_path):
    """Without one on ``sessions(created)`` every purge read the whole table (the sessions' JSON
    and all) while holding the write lock other workers' session touches wait for."""
    store = SqliteStore(tmp_path / "s.sqlite3")
    try:
        plan = store.db.execute("EXPLAIN QUERY PLAN SELECT rowid FROM sessions WHERE created < ? LIMIT 500",
                                (0.0,)).fetchall()
        assert any("sessions_created" in str(row) for row in plan), plan
    finally:
        store.close()
