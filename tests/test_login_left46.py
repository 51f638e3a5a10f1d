"""Review left46 of the login front door, against a real two-worker ``authgw serve``.

- The door's budgets (parked requests per address, failed client authentications at the OIDC
  token endpoint) are kept in the session store, shared by the workers: with a bucket per worker,
  two workers gave a flood about twice the budget (48 parks, 59 wrong secrets for a budget of 30).
- WS-Federation sign-out is a GET any page can send: one the browser says comes from another site
  asks the user first (the Sign out button), then goes to the registered ``wreply``.
- A sign-in whose answer fails on the store (noting the SAML SP, storing the OIDC code) leaves no
  session behind (it was left, counted in the user's sessions, its cookie never sent).
"""

from __future__ import annotations

import sqlite3
from urllib.parse import parse_qs, urlsplit

import pytest

from support.login import LoginSite, hidden, unsigned_authn_request
from support.pki import CA
from support.slapd import Slapd

REDIRECT = "https://app.example.test/cb"
CLIENT = {"client_id": "app", "redirect_uri": REDIRECT, "response_type": "code",
          "scope": "openid", "code_challenge": "a" * 43, "code_challenge_method": "S256"}
SP_ID, ACS = "https://sp.example.test/", "https://sp.example.test/acs"
REALM, REPLY, SIGNED_OUT = "urn:rp:left46", "https://rp.example.test/cb", "https://rp.example.test/bye"
#: Far more requests than two budgets (2 x 30) and what they refill while being sent.
FLOOD = 200


def login_settings() -> dict:
    return {"oidc": {"clients": [{"client_id": "app", "redirect_uris": [REDIRECT],
                                  "client_secret": {"env": "APP_SECRET"}}]},
            "saml": {"service_providers": [{"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress",
                                            "name_id_source": "email"}]},
            "wsfed": {"relying_parties": [{"realm": REALM, "reply_urls": [REPLY], "signout_urls": [SIGNED_OUT]}]}}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("left46ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def door(tmp_path_factory, slapd):
    base = tmp_path_factory.mktemp("left46")
    site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                     login=login_settings(), env={"APP_SECRET": "s3cret-s3cret-s3cret"})
    site.gw = site.start(workers=2)
    site.db = site.dir / "state0" / "login" / "sessions.sqlite3"
    yield site
    site.stop()


@pytest.fixture(scope="module")
def redis_door(tmp_path_factory, slapd):
    from support.redis import RedisServer

    base = tmp_path_factory.mktemp("left46redis")
    redis = RedisServer(base / "redis").start()
    settings = {**login_settings(), "sessions": {"store": "redis", "redis_url": redis.url}}
    site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                     login=settings, env={"APP_SECRET": "s3cret-s3cret-s3cret"})
    site.redis = redis
    site.gw = site.start(workers=2)
    yield site
    site.stop()
    redis.stop()


def fresh(site):
    """A client that opens a new connection per request (the kernel spreads them over the workers)."""
    browser = site.client()
    browser.headers["Connection"] = "close"
    return browser


def parks_until_refused(site, address: str) -> int:
    """Parks from *address* (forwarded by the trusted proxy to the main listener: the door's own TLS
    listener counts its socket peer) until the first refusal."""
    browser = fresh(site)
    for served in range(FLOOD):
        answer = browser.get(f"{site.gw.url}/oidc/authorize", params={**CLIENT, "state": str(served)},
                             headers={"X-Forwarded-For": address}, allow_redirects=False, timeout=15)
        if not answer.headers.get("Location", "").startswith("/login?req="):
            assert answer.headers.get("X-Refused-Reason") == "login.too_many_requests", answer.headers
            return served
    pytest.fail("never refused")


def wrong_secrets_until_refused(site, address: str) -> int:
    browser = fresh(site)
    for failed in range(FLOOD):
        answer = browser.post(f"{site.gw.url}/oidc/token", auth=("app", f"wrong-{failed}"),
                              data={"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT},
                              headers={"X-Forwarded-For": address}, timeout=15)
        if answer.status_code != 401:
            assert answer.status_code == 429, (answer.status_code, answer.text)
            assert int(answer.headers["Retry-After"]) >= 1
            return failed
    pytest.fail("never refused")


# -- 1. budgets shared by the workers --------------------------------------------------------------

def test_parking_budget_is_one_per_address_across_workers(door):
    # 30 at once plus 30 a minute: a bucket per worker gave about 60 on two workers.
    assert parks_until_refused(door, "203.0.113.9") <= 35


def test_token_endpoint_failure_budget_is_shared_across_workers(door):
    assert wrong_secrets_until_refused(door, "203.0.113.10") <= 35


def test_budgets_are_shared_across_workers_with_redis(redis_door):
    assert parks_until_refused(redis_door, "203.0.113.11") <= 35
    assert wrong_secrets_until_refused(redis_door, "203.0.113.12") <= 35


# -- 2. WS-Federation sign-out from another site -----------------------------------------------------

def signed_in(site, browser) -> bool:
    return "signed in as" in browser.get(f"{site.url}/login", timeout=15).text


def test_cross_site_wsignout_asks_first_then_goes_to_the_registered_reply(door):
    browser = door.client()
    door.sign_in(browser, "alice", "Alice-pw-1")
    assert signed_in(door, browser)
    for action in ("wsignout1.0", "wsignoutcleanup1.0"):
        page = browser.get(f"{door.url}/wsfed", params={"wa": action, "wtrealm": REALM, "wreply": SIGNED_OUT},
                           headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False, timeout=15)
        assert page.status_code == 200, (page.status_code, page.headers)
        assert "signed in as" in page.text and "/logout?then=" in page.text
        assert signed_in(door, browser), action  # nothing ended by another site's GET
    # an unregistered wreply is still refused, before anything
    refused = browser.get(f"{door.url}/wsfed", params={"wa": "wsignout1.0", "wreply": "https://evil.example.test/"},
                          headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False, timeout=15)
    assert refused.status_code == 400 and refused.headers["X-Refused-Reason"] == "wsfed.reply_not_registered"
    # the user confirms: the Sign out button (same origin, CSRF token) ends it and goes to wreply
    action = page.text.split('action="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    out = browser.post(f"{door.url}{action}", data={"csrf": hidden(page.text, "csrf")},
                       headers={"Origin": door.url, "Sec-Fetch-Site": "same-origin"}, allow_redirects=False,
                       timeout=15)
    assert out.status_code == 303 and out.headers["Location"] == SIGNED_OUT, (out.status_code, out.text[:300])
    assert not signed_in(door, browser)


def test_same_origin_or_typed_wsignout_acts_at_once(door):
    browser = door.client()
    door.sign_in(browser, "alice", "Alice-pw-1")
    out = browser.get(f"{door.url}/wsfed", params={"wa": "wsignout1.0", "wreply": REPLY},
                      headers={"Sec-Fetch-Site": "none"}, allow_redirects=False, timeout=15)
    assert out.status_code == 303 and out.headers["Location"] == REPLY
    assert not signed_in(door, browser)


# -- 3. a failed completion leaves no session ----------------------------------------------------------

def session_rows(site) -> int:
    db = sqlite3.connect(site.db)
    try:
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def failing(door):
    """``failing(table, when)``: a trigger that makes the store's INSERTs into *table* fail (as a
    full disk would), dropped at the end."""
    names = []

    def make(table: str, when: str = "1") -> None:
        name = f"left46_fail_{len(names)}"
        db = sqlite3.connect(door.db)
        try:
            db.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {when} "
                       "BEGIN SELECT RAISE(ABORT, 'left46: the store refuses this write'); END")
            db.commit()
        finally:
            db.close()
        names.append(name)

    yield make
    db = sqlite3.connect(door.db)
    try:
        for name in names:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
        db.commit()
    finally:
        db.close()


def test_a_saml_answer_the_store_cannot_note_leaves_no_session(door, failing):
    failing("participants")
    browser = door.client()
    before = session_rows(door)
    page = door.sign_in(browser, "alice", "Alice-pw-1", url=unsigned_authn_request(door.url, SP_ID, ""))
    assert page.status_code == 503, (page.status_code, page.text[:300])
    assert not any(name.endswith("authgw_session") for name in browser.cookies.keys())
    assert session_rows(door) == before  # the new session went with its failed answer


def test_an_oidc_code_the_store_cannot_keep_leaves_no_session(door, failing):
    failing("pending", "NEW.key LIKE 'code:%'")
    browser = door.client()
    before = session_rows(door)
    start = browser.get(f"{door.url}/oidc/authorize", params={**CLIENT, "state": "st"}, allow_redirects=False,
                        timeout=15)
    assert start.headers["Location"].startswith("/login?req=")
    page = door.sign_in(browser, "alice", "Alice-pw-1", url=door.url + start.headers["Location"],
                        allow_redirects=False)
    # no code: the relying party is told at its redirect_uri, or the 503 page; no session either way
    if page.status_code == 303:
        assert parse_qs(urlsplit(page.headers["Location"]).query)["error"] == ["temporarily_unavailable"]
    else:
        assert page.status_code == 503, (page.status_code, page.text[:300])
    assert not any(name.endswith("authgw_session") for name in browser.cookies.keys())
    assert session_rows(door) == before


# -- 2b. the same in Chromium: another site's top-level navigation, then the user's click ---------

@pytest.fixture(scope="module")
def browser_world(tmp_path_factory, slapd):
    """A door whose relying party's sign-out reply is a plain-http page on 127.0.0.1 (another site
    than ``https://localhost:PORT``), served with the "other site" page that starts the sign-out."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from support.net import free_port

    port = free_port()
    other = f"http://127.0.0.1:{port}"
    base = tmp_path_factory.mktemp("left46chromium")
    settings = {"wsfed": {"relying_parties": [{"realm": REALM, "reply_urls": [REPLY],
                                               "signout_urls": [f"{other}/bye"]}]}}
    site = LoginSite(base / "idp", slapd, CA.create(), login=settings)
    site.gw = site.start(workers=2)
    signout = f"{site.url}/wsfed?wa=wsignout1.0&wtrealm={REALM}&wreply={other}/bye"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = (f'<a id="go" href="{signout.replace("&", "&amp;")}">sign out</a>' if self.path == "/evil"
                    else "<h1 id=bye>bye</h1>").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site, other
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    site.stop()


def test_chromium_another_sites_signout_link_asks_the_user(browser_world):
    from support.browser import chromium

    site, other = browser_world
    with chromium(trust=[site.server_cert]) as browser:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{site.url}/login")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("text=signed in as", timeout=15000)
        page.goto(f"{other}/evil")
        page.click("#go")  # a top-level cross-site navigation: the Lax session cookie goes along
        page.wait_for_load_state()
        assert page.url.startswith(f"{site.url}/wsfed?"), page.url
        assert "signed in as" in page.content()  # asked, not signed out
        check = context.new_page()  # the same cookies
        check.goto(f"{site.url}/login")
        assert "signed in as" in check.content()
        # the user confirms: signed out, and on to the registered wreply (CSP form-action allows it)
        page.click("button[type=submit]")
        page.wait_for_selector("#bye", timeout=15000)
        assert page.url == f"{other}/bye"
        check.goto(f"{site.url}/login")
        assert 'id="password"' in check.content()


def test_budgets_fail_closed_when_their_store_is_down(tmp_path, slapd):
    """With the Redis store stopped, no secret is compared at the token endpoint (503, not 401:
    nothing is told while the failures cannot be counted) and nothing is parked."""
    from support.redis import RedisServer

    redis = RedisServer(tmp_path / "redis").start()
    site = LoginSite(tmp_path / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                     login={**login_settings(), "sessions": {"store": "redis", "redis_url": redis.url}},
                     env={"APP_SECRET": "s3cret-s3cret-s3cret"})
    try:
        site.gw = site.start()
        browser = fresh(site)
        assert wrong_secrets_until_refused(site, "203.0.113.13") <= 35  # counted while Redis answers
        redis.stop()
        token = browser.post(f"{site.gw.url}/oidc/token", auth=("app", "wrong"),
                             data={"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT},
                             headers={"X-Forwarded-For": "203.0.113.14"}, timeout=15)
        assert token.status_code == 503 and token.json() == {"error": "temporarily_unavailable"}, token.text
        start = browser.get(f"{site.gw.url}/oidc/authorize", params={**CLIENT, "state": "s"},
                            headers={"X-Forwarded-For": "203.0.113.14"}, allow_redirects=False, timeout=15)
        assert start.status_code == 303
        assert start.headers["Location"].startswith(REDIRECT + "?error=temporarily_unavailable&")
    finally:
        site.stop()
        redis.stop()


def test_a_shared_bucket_refills_and_is_purged_once_full(tmp_path):
    """The store's bucket (SQLite): the budget at once, then the rate; a full bucket's row goes
    with the purge (addresses seen once do not pile up in the file)."""
    from gateway.plugins.login.sessions import SqliteStore

    store = SqliteStore(tmp_path / "sessions.sqlite3")
    try:
        assert [store.take_token("k", 3, 1.0, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
        assert store.take_token("k", 3, 1.0, 100.0) == pytest.approx(1.0)  # refused, nothing spent
        assert store.take_token("k", 3, 1.0, 100.0, spend=False) == pytest.approx(1.0)
        assert store.take_token("k", 3, 1.0, 99.0) == pytest.approx(1.0)  # a clock stepped back refills nothing
        assert store.take_token("k", 3, 1.0, 101.0) == 0.0
        assert store.take_token("other", 3, 1.0, 101.0) == 0.0  # another key is not touched
        store.purge(103.5, 0.0)  # "k" is full again at 104, "other" at 102
        rows = store.db.execute("SELECT key FROM buckets").fetchall()
        assert rows == [("k",)]
        store.purge(104.5, 0.0)
        assert store.db.execute("SELECT COUNT(*) FROM buckets").fetchone()[0] == 0
    finally:
        store.close()
