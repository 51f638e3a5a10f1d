"""Second review of the login door's sessions and pages (the browser side), through a real
``authgw serve`` in front of slapd, and headless Chromium where a browser's behaviour is the point:

- a cookie whose value holds a space is not read as several cookies: aiohttp's ``Cookie`` parser
  splits a value at white space, so a sibling host (or a plain-http answer) setting
  ``x=a __Host-authgw_session=...`` for the parent domain planted the attacker's own session in
  the victim's browser (login CSRF: the victim's next sign-in at a service is the attacker's),
  which the ``__Host-`` prefix is there to prevent;
- a form field that decodes to a lone surrogate (a body in ``charset=utf-7`` or
  ``unicode_escape``) is the form or a sign-in, never a 500; the session manager names no record
  by an id it could not have made;
- a sign-out the session store cannot take now (a lock held on the SQLite file) still takes the
  session cookie from the browser: it stayed, and the browser was signed in again once the lock
  was gone.

No assertion depends on how fast anything runs."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.browser import chromium
from support.login import LoginSite, hidden
from support.net import free_port
from support.pki import CA
from support.slapd import Slapd

SESSION = "__Host-authgw_session"
CSRF = "__Host-authgw_csrf"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    server.add_user("mallory", "Mallory-pw-1", cn="Mallory Attacker", mail="mallory@example.com")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    made = LoginSite(tmp_path_factory.mktemp("site"), slapd, CA.create(), host="login.example.test")
    made.gw = made.start()
    yield made
    made.stop()


def door(site) -> tuple[str, dict[str, str]]:
    """The door's address for a client without the test name in DNS, and the Host it is sent."""
    return f"https://127.0.0.1:{site.port}", {"Host": f"login.example.test:{site.port}"}


def signed_in_cookie(site, username: str, password: str) -> str:
    url, host = door(site)
    browser = site.client()
    token = hidden(browser.get(f"{url}/login", headers=host).text, "csrf")
    page = browser.post(f"{url}/login", headers=host, data={"csrf": token, "username": username, "password": password})
    assert "You are signed in as" in page.text, page.text[:300]
    return browser.cookies[SESSION]


class _Planter(BaseHTTPRequestHandler):
    """A page of a sibling host (``evil.example.test``) that sets one cookie for the parent domain."""

    cookie = ""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Set-Cookie", self.cookie)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<p>nothing to see</p>")

    def log_message(self, *args):
        pass


def test_a_sibling_host_cannot_plant_a_session_through_a_cookie_value_with_a_space(site):
    planted = signed_in_cookie(site, "mallory", "Mallory-pw-1")  # the attacker's own session
    port = free_port()
    handler = type("Planter", (_Planter,), {"cookie": f"x=a {SESSION}={planted}; Domain=example.test; Path=/"})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with chromium(trust=[site.server_cert], args=["--host-resolver-rules=MAP *.example.test 127.0.0.1"]) as browser:
            page = browser.new_page()
            page.goto(f"http://evil.example.test:{port}/")
            sent = [c for c in page.context.cookies() if c["name"] == "x"]
            assert sent and f"{SESSION}=" in sent[0]["value"]  # the browser took the value as written
            page.goto(f"{site.url}/login")
            text = page.inner_text("body")
            assert "Mallory" not in text and "signed in as" not in text, text  # it was "signed in as Mallory"
            assert page.locator("#username").count() == 1
            # The victim signs in as themselves: their own session, not the attacker's.
            page.fill("#username", "alice")
            page.fill("#password", "Alice-pw-1")
            page.click("button[type=submit]")
            assert "You are signed in as Alice Liddell." in page.inner_text("body")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_door_reads_its_cookies_only_as_whole_cookies(site):
    """What a browser sends for a cookie planted with a space, and for a quoted value, read by
    the door: never the attacker's session or CSRF seed."""
    planted = signed_in_cookie(site, "mallory", "Mallory-pw-1")
    url, host = door(site)
    client = site.client()
    for cookie in (f"x=a {SESSION}={planted}", f"x=a\t{SESSION}={planted}", f"a=1; x=b {SESSION}={planted}; c=2"):
        page = client.get(f"{url}/login", headers={**host, "Cookie": cookie})
        assert page.status_code == 200 and "Mallory" not in page.text, cookie
        assert hidden(page.text, "csrf") and 'id="username"' in page.text
    # Login CSRF by the CSRF cookie: a seed the attacker chose and knows the token of.
    seed = "attacker-chosen-seed-0001"
    token = hidden(client.get(f"{url}/login", headers={**host, "Cookie": f"{CSRF}={seed}"}).text, "csrf")
    posted = site.client().post(f"{url}/login", headers={**host, "Cookie": f"x=a {CSRF}={seed}"},
                                data={"csrf": token, "username": "mallory", "password": "Mallory-pw-1"})
    assert posted.status_code == 403 and "signed in as" not in posted.text
    assert seed not in posted.headers.get("Set-Cookie", "")
    # The session cookie as the door set it is still read.
    page = client.get(f"{url}/login", headers={**host, "Cookie": f"{SESSION}={planted}"})
    assert "You are signed in as Mallory Attacker." in page.text


@pytest.mark.parametrize("charset", ["utf-7", "unicode_escape"])
def test_a_form_field_that_decodes_to_a_lone_surrogate_is_never_a_500(site, charset):
    url, host = door(site)
    browser = site.client()
    token = hidden(browser.get(f"{url}/login", headers=host).text, "csrf")
    surrogate = "%2B2AA-" if charset == "utf-7" else "%5Cud800"
    headers = {**host, "Content-Type": f"application/x-www-form-urlencoded; charset={charset}"}
    for body, status, says in ((f"csrf={token}&username=alice&password=wrong&req={surrogate}", 401, "incorrect"),
                               (f"csrf={token}&username=alice&password=Alice-pw-1&req={surrogate}", 200,
                                "You are signed in as Alice Liddell."),
                               (f"csrf={token}&username={surrogate}&password=x", 401, "incorrect")):
        answer = browser.post(f"{url}/login", data=body, headers=headers)
        assert (answer.status_code, says in answer.text) == (status, True), (body, answer.status_code, answer.text[:200])
        assert hidden(answer.text, "req") is None
    assert "Traceback" not in site.gw.output() and "UnicodeEncodeError" not in site.gw.output()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_an_id_no_store_can_encode_names_no_record(tmp_path, redis_server, kind):
    """Whatever a handler passes on from a request, the session manager looks up only ids it
    could have made: a lone surrogate reached SQLite (and Redis) and raised UnicodeEncodeError."""
    from gateway.plugins.login.sessions import RedisStore, SessionManager, SqliteStore
    from gateway.plugins.login.settings import SessionSettings

    if kind == "redis":
        redis_server.client().flushdb()
        store = RedisStore(redis_server.url, 3600)
    else:
        store = SqliteStore(tmp_path / "sessions.sqlite3")
    try:
        manager = SessionManager(SessionSettings(), store, b"k" * 32)
        kept = manager.park({"protocol": "saml"}, 60)
        for bad in ("\ud800", "a\udcff", "x" * 65, "tab\there", ""):
            assert manager.peek(bad) is None and manager.unpark(bad) is None and manager.release(bad) is None
            assert manager.unpark_as(bad) is None and manager.end_index(bad) is False
            assert manager.by_index(bad) is None and manager.keys_of_indexes([bad]) == {}
        assert manager.peek(kept) == {"protocol": "saml"} and manager.unpark(kept) == {"protocol": "saml"}
    finally:
        store.close()


def test_a_sign_out_the_store_cannot_take_now_still_ends_the_browsers_session(site):
    """A lock held on the SQLite store (an operator's ``sqlite3`` shell mid-transaction, a
    backup) when the user presses Sign out: 503, and this browser forgets its session all the
    same. It kept the cookie, and once the lock was gone the browser was signed in again."""
    import sqlite3

    url, host = door(site)
    browser = site.client()
    token = hidden(browser.get(f"{url}/login", headers=host).text, "csrf")
    page = browser.post(f"{url}/login", headers=host, data={"csrf": token, "username": "alice", "password": "Alice-pw-1"})
    assert "You are signed in as Alice Liddell." in page.text
    lock = sqlite3.connect(site.dir / "state0" / "login" / "sessions.sqlite3", isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the write lock: the door's delete waits its busy timeout, then gives up
        out = browser.post(f"{url}/logout", headers=host, data={"csrf": hidden(page.text, "csrf")})
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert out.status_code == 503 and "Sign-in is not available right now." in out.text
    assert SESSION in out.headers.get("Set-Cookie", "")  # removed
    assert SESSION not in browser.cookies
    after = browser.get(f"{url}/login", headers=host)
    assert after.status_code == 200 and "signed in as" not in after.text and 'id="username"' in after.text
