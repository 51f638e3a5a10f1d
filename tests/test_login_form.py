"""The ``/login`` password form and browser sessions, through a real ``authgw serve`` in front of
a real slapd (the AD account states played by slapd's retcode overlay)."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from support.login import LoginSite, hidden
from support.pki import CA
from support.redis import RedisServer
from support.slapd import Slapd

SESSION = "__Host-authgw_session"  # on https the cookies carry the __Host- prefix
AD = "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {}, v4563"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", retcode=True).start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-pw-1", cn="Bob <b>Builder</b>", mail="bob@example.com")
    server.add_user("locked", "pw", cn="Locked", bind_error=(49, AD.format("775")))
    server.add_user("expired", "pw", cn="Expired", bind_error=(49, AD.format("532")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca():
    return CA.create()


@pytest.fixture
def site(tmp_path, slapd, ca):
    made = []

    def make(**kw) -> LoginSite:
        made.append(LoginSite(tmp_path / f"site{len(made)}", slapd, ca, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_the_form_is_plain_accessible_html_with_a_csrf_token(site):
    s = site()
    s.start()
    page = s.client().get(f"{s.url}/login")
    assert page.status_code == 200
    assert '<label for="username">Username</label>' in page.text and 'id="password" name="password"' in page.text
    assert 'autocomplete="current-password"' in page.text and "<script" not in page.text  # no JS needed
    assert hidden(page.text, "csrf")
    assert "script-src" not in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Frame-Options"] == "DENY"
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("__Host-authgw_csrf=") and "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie


def test_a_password_login_makes_a_secure_session_audited_like_auth(site):
    s = site()
    gw = s.start()
    browser = s.client()
    page = s.sign_in(browser, "alice", "Alice-pw-1")
    assert page.status_code == 200
    assert "You are signed in as Alice Liddell." in page.text
    session = next(c for c in page.headers["Set-Cookie"].split(", __Host-") if c.startswith("authgw_session="))
    assert "HttpOnly" in session and "Secure" in session and "SameSite=Lax" in session
    assert "You are signed in as Alice Liddell." in browser.get(f"{s.url}/login").text  # the session holds
    line = [a for a in gw.audit() if a["front_door"] == "login"]
    assert [(a["outcome"], a["username"]) for a in line] == [("success", "alice")]
    assert "Alice-pw-1" not in gw.output()


def test_unknown_user_and_wrong_password_read_the_same(site):
    s = site()
    gw = s.start()
    wrong = s.sign_in(s.client(), "alice", "nope")
    unknown = s.sign_in(s.client(), "nobody-here", "nope")
    assert wrong.status_code == unknown.status_code == 401
    assert "The username or password is incorrect." in wrong.text

    def neutral(page):
        return re.sub(r'value="[^"]*"', "", page.text)

    assert neutral(wrong) == neutral(unknown)
    assert "authgw_session" not in wrong.headers.get("Set-Cookie", "")
    outcomes = sorted((a["username"], a["outcome"]) for a in gw.audit())
    assert outcomes == [("alice", "invalid_credentials"), ("nobody-here", "user_not_found")]


@pytest.mark.parametrize("user, message", [("locked", "Your account is locked."),
                                           ("expired", "Your password has expired or must be changed.")])
def test_account_states_are_said(site, user, message):
    s = site()
    gw = s.start()
    page = s.sign_in(s.client(), user, "pw")
    assert page.status_code == 401 and message in page.text
    assert gw.audit()[-1]["outcome"] == "account_state"


def test_throttling_is_that_of_auth(site):
    s = site(gateway={"throttle": {"enabled": True, "user_failures": 2, "window": 60}})
    s.start()
    browser = s.client()
    assert [s.sign_in(browser, "alice", "bad").status_code for _ in range(2)] == [401, 401]
    page = s.sign_in(browser, "alice", "Alice-pw-1")
    assert page.status_code == 429 and "Too many failed attempts" in page.text
    assert "authgw_session" not in page.headers.get("Set-Cookie", "")


def test_a_post_without_the_csrf_token_is_refused_before_the_chain(site):
    s = site()
    gw = s.start()
    browser = s.client()
    browser.get(f"{s.url}/login")  # has the CSRF cookie, but posts no token
    page = browser.post(f"{s.url}/login", data={"username": "alice", "password": "Alice-pw-1"})
    assert page.status_code == 403 and "This form has expired" in page.text
    forged = s.client()  # a token from another browser does not fit this browser's cookie
    forged.get(f"{s.url}/login")
    token = hidden(s.client().get(f"{s.url}/login").text, "csrf")
    page = forged.post(f"{s.url}/login", data={"username": "alice", "password": "Alice-pw-1", "csrf": token})
    assert page.status_code == 403
    assert gw.audit() == []  # nothing reached the directory


def test_a_planted_session_cookie_never_becomes_a_session(site):
    s = site()
    s.start()
    victim = s.client()
    victim.cookies.set(SESSION, "attacker-chosen.value")
    first = s.sign_in(victim, "alice", "Alice-pw-1")
    issued = first.cookies.get(SESSION)
    assert issued and not issued.startswith("attacker-chosen")
    # Signing in again rotates the id and ends the session the browser had.
    holder = s.client()
    holder.cookies.set(SESSION, issued)
    assert "signed in as" in holder.get(f"{s.url}/login").text
    again = s.client()
    again.cookies.set(SESSION, issued)
    second = s.sign_in(again, "alice", "Alice-pw-1")
    assert second.cookies.get(SESSION) not in (None, issued)
    assert "signed in as" not in holder.get(f"{s.url}/login").text


def test_hostile_names_are_escaped(site):
    s = site()
    s.start()
    page = s.sign_in(s.client(), "bob", "Bob-pw-1")
    assert "Bob &lt;b&gt;Builder&lt;/b&gt;" in page.text and "<b>" not in page.text
    page = s.sign_in(s.client(), '"><script>alert(1)</script>', "x")
    assert "<script>alert(1)" not in page.text and page.status_code == 401


def test_idle_and_absolute_lifetimes_end_sessions(site):
    # Generous margins: a busy machine may take a second to answer, never three.
    s = site(login={"sessions": {"idle": 3.0, "absolute": 7.0}})
    s.start()
    idle, busy = s.client(), s.client()
    s.sign_in(idle, "alice", "Alice-pw-1")
    s.sign_in(busy, "alice", "Alice-pw-1")
    started = time.monotonic()
    while time.monotonic() - started < 4.5:  # busy keeps its session alive, idle does not
        assert "signed in as" in busy.get(f"{s.url}/login").text
        time.sleep(0.5)
    assert "signed in as" not in idle.get(f"{s.url}/login").text
    while time.monotonic() - started < 7.5:
        assert busy.get(f"{s.url}/login").status_code == 200
        time.sleep(0.5)
    assert "signed in as" not in busy.get(f"{s.url}/login").text  # absolute limit, however busy


def test_logout_needs_the_csrf_token_and_ends_the_session(site):
    s = site()
    s.start()
    browser = s.client()
    page = s.sign_in(browser, "alice", "Alice-pw-1")
    assert browser.post(f"{s.url}/logout", data={}).status_code == 403
    assert "signed in as" in browser.get(f"{s.url}/login").text
    out = browser.post(f"{s.url}/logout", data={"csrf": hidden(page.text, "csrf")})
    assert "You are signed out." in out.text
    assert "signed in as" not in browser.get(f"{s.url}/login").text


def test_logout_through_redis_ends_the_session_for_every_worker(site, tmp_path):
    """Each cookie check touches the session (a compare-and-set in Redis, never recreating a
    deleted record: tests/test_login_sessions.py makes the interleaving); after the logout no
    worker takes the cookie."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        r = site(login={"sessions": {"store": "redis", "redis_url": redis.url}})
        r.start(workers=2)
        browser = r.client()
        page = r.sign_in(browser, "alice", "Alice-pw-1")
        assert all("signed in as" in browser.get(f"{r.url}/login").text for _ in range(4))  # touched
        cookie = browser.cookies.get(SESSION)
        assert "You are signed out." in browser.post(f"{r.url}/logout", data={"csrf": hidden(page.text, "csrf")}).text
        assert not redis.client().keys("authgw:login:s:*")
        kept = r.client()  # a copy of the cookie the logout dropped
        kept.cookies.set(SESSION, cookie)
        assert not any("signed in as" in kept.get(f"{r.url}/login").text for _ in range(4))
    finally:
        redis.stop()


def test_sessions_are_shared_by_workers_and_by_instances_through_redis(site, tmp_path):
    s = site()
    s.start(workers=2)
    browser = s.client()
    s.sign_in(browser, "alice", "Alice-pw-1")
    assert all("signed in as" in browser.get(f"{s.url}/login").text for _ in range(8))  # both workers
    redis = RedisServer(tmp_path / "redis").start()
    try:
        r = site(login={"sessions": {"store": "redis", "redis_url": redis.url}})
        one = r.start()
        browser = r.client()
        r.sign_in(browser, "alice", "Alice-pw-1")
        one.stop()
        # Another instance with its own state directory and the same Redis. Instances share the
        # keys of STATE/login/ (docs/login.md), not the session file.
        shutil.copytree(one.state_dir / "login", tmp_path / "other" / "login",
                        ignore=shutil.ignore_patterns("sessions.sqlite3*"))
        r.start(state=tmp_path / "other")
        assert "signed in as" in browser.get(f"{r.url}/login").text
    finally:
        redis.stop()


def test_the_page_strings_are_localisable_and_unknown_keys_are_config_errors(site, tmp_path):
    s = site(login={"title": "Anmelden", "messages": {"lang": "de", "username": "Benutzername",
                                                      "invalid": "Benutzername oder Kennwort ist falsch."}})
    s.start()
    page = s.sign_in(s.client(), "alice", "falsch")
    assert '<html lang="de">' in page.text and "<h1>Anmelden</h1>" in page.text
    assert '<label for="username">Benutzername</label>' in page.text
    assert "Benutzername oder Kennwort ist falsch." in page.text
    from support.gateway import authgw
    bad = site(login={"messages": {"usernme": "x"}})
    result = authgw("check", "--config", str(bad.conf), "--state-dir", str(tmp_path / "st"), timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "login.yaml:1" in output and "usernme" in output


def test_a_session_store_that_is_down_gives_503_never_500(site, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    r = site(login={"sessions": {"store": "redis", "redis_url": redis.url}})
    gw = r.start()
    browser = r.client()
    r.sign_in(browser, "alice", "Alice-pw-1")
    redis.stop()
    page = browser.get(f"{r.url}/login")
    assert page.status_code == 503 and "Sign-in is not available right now." in page.text
    assert "signed in as" not in page.text
    token = r.client().post(f"{r.url}/oidc/token", data={"grant_type": "authorization_code", "code": "x"})
    assert token.status_code in (401, 503)  # no client is registered here: refused before the store
    assert "_handle_request" not in gw.output() and "session store unavailable" in gw.output()


def test_a_form_posted_from_another_site_is_refused_before_the_chain(site):
    s = site()
    gw = s.start()
    browser = s.client()
    page = browser.get(f"{s.url}/login")
    form = {"csrf": hidden(page.text, "csrf"), "username": "alice", "password": "Alice-pw-1"}
    for headers in ({"Origin": "https://evil.example.test"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": s.url.replace("localhost", "sub.localhost")}):
        refused = browser.post(f"{s.url}/login", data=form, headers=headers)
        assert (refused.status_code, refused.headers.get("X-Refused-Reason")) == (403, "login.cross_site"), headers
    assert gw.audit() == []  # nothing reached the directory
    page = browser.post(f"{s.url}/login", data=form, headers={"Origin": s.url, "Sec-Fetch-Site": "same-origin"})
    assert "You are signed in as Alice Liddell." in page.text
    out = browser.post(f"{s.url}/logout", data={"csrf": hidden(page.text, "csrf")},
                       headers={"Origin": "https://evil.example.test"})
    assert out.status_code == 403 and "signed in as" in browser.get(f"{s.url}/login").text
    assert page.headers["Referrer-Policy"] == "same-origin"  # else Chromium posts the form with Origin: null


def test_cookies_carry_the_host_prefix_so_a_planted_csrf_cookie_is_not_read(site):
    # A sibling host or a plain-http answer can plant `authgw_csrf` (and learn its token from a
    # GET of its own); it cannot plant a __Host- cookie, and the door reads only that one.
    s = site()
    s.start()
    chosen = "attacker-chosen-csrf-0001"
    attacker = s.client()
    token = hidden(attacker.get(f"{s.url}/login", headers={"Cookie": f"authgw_csrf={chosen}"}).text, "csrf")
    victim = s.client()
    page = victim.post(f"{s.url}/login", data={"csrf": token, "username": "bob", "password": "Bob-pw-1"},
                       headers={"Cookie": f"authgw_csrf={chosen}"})
    assert page.status_code == 403 and "Builder" not in page.text
    cookies = page.headers["Set-Cookie"]
    assert "__Host-authgw_csrf=" in cookies and chosen not in cookies and "Path=/" in cookies
    page = s.sign_in(s.client(), "alice", "Alice-pw-1")
    assert "__Host-authgw_session=" in page.headers["Set-Cookie"] and "Domain" not in page.headers["Set-Cookie"]


def _store(tmp_path):
    from gateway.plugins.login.sessions import SessionManager, SqliteStore
    from gateway.plugins.login.settings import SessionSettings

    return SessionManager(SessionSettings(), SqliteStore(tmp_path / "s.sqlite3"), b"k" * 32)


def test_the_account_check_of_a_session_unit(tmp_path):
    from gateway import Identity

    manager = _store(tmp_path)
    alice = Identity(subject="guid-a", username="alice", method="ldap", groups=("staff",))
    _, known = manager.create(alice, directory="guid-a")
    _, unknown = manager.create(alice, directory=None)  # no directory held it at sign-in
    assert manager.recheck_due(known)  # the first reuse is always checked
    now = Identity(subject="guid-a", username="alice", method="ldap", display_name="A.", groups=("admins",))
    refreshed = manager.rechecked(known, now)
    assert refreshed.identity.groups == ("admins",) and refreshed.identity.display_name == "A."
    assert refreshed.identity.authenticated_at == alice.authenticated_at and not manager.recheck_due(refreshed)
    assert manager.by_index(known.index).identity.groups == ("admins",)  # kept in the store, for every worker
    assert manager.rechecked(known, None) is None  # deleted
    assert manager.rechecked(known, Identity(subject="guid-b", username="alice", method="ldap")) is None  # name reused
    assert manager.rechecked(known, Identity(subject="guid-a", username="alice", method="ldap",
                                             account_state="ldap.disabled")) is None
    assert manager.rechecked(unknown, None) is not None  # cannot be told from "never known": stays
    # The directory could not answer at sign-in: not knowing the account later is not given the
    # benefit of "never known"; an answer that knows it makes the session like any other.
    _, unasked = manager.create(alice, directory=None, asked=False)
    assert manager.rechecked(unasked, None) is None
    _, unasked = manager.create(alice, directory=None, asked=False)
    vouched = manager.rechecked(unasked, now)
    assert vouched.asked and vouched.directory == "guid-a"
    assert manager.by_index(unasked.index).asked  # stored
    assert manager.rechecked(vouched, None) is None


def test_a_session_signed_in_while_the_directory_was_down_ends_when_its_account_is_gone(tmp_path, ca):
    """The credential cache signs users in while the directory is down, so their sessions could
    not learn how the directory knows them: when it is back and no longer knows the account,
    the session ends (it used to stay, as for an identity no directory ever held)."""
    from urllib.parse import urlsplit

    directory = Slapd(tmp_path / "slapd").start()
    try:
        for user in ("frank", "grace"):
            directory.add_user(user, f"{user}-pw-1", groups=["staff"])
        s = LoginSite(tmp_path / "site", directory, ca, gateway={"plugins": ["login", "cache"]}, login={
            "saml": {"service_providers": [{"entity_id": "https://sp.example.test/", "idp_initiated": True,
                                            "acs_urls": ["https://sp.example.test/acs"]}]}})
        gw = s.start()
        for user in ("frank", "grace"):  # live sign-ins: the cache learns the passwords
            assert s.sign_in(s.client(), user, f"{user}-pw-1").status_code == 200
        directory.stop()
        browsers = {user: s.client() for user in ("frank", "grace")}
        for user, browser in browsers.items():
            signed = s.sign_in(browser, user, f"{user}-pw-1")
            assert signed.status_code == 200 and 'id="password"' not in signed.text, user
        assert "login: the directory cannot check frank's account" in gw.output()
        directory.start()
        directory.delete(directory.user_dn("frank"))
        idp = f"{s.url}/saml/idp?sp=https://sp.example.test/"
        deadline = time.monotonic() + 20
        while (kept := browsers["grace"].get(idp, allow_redirects=False)).status_code == 503:
            assert time.monotonic() < deadline, "the directory never answered again"
            time.sleep(0.2)
        assert kept.status_code == 200 and "SAMLResponse" in kept.text  # still there: answered
        gone = browsers["frank"].get(idp, allow_redirects=False)
        assert gone.status_code == 303 and urlsplit(gone.headers["Location"]).path == "/login"
        assert "SAMLResponse" not in gone.text
        assert "the account of frank is gone" in gw.output()
    finally:
        if "s" in locals():
            s.stop()
        directory.stop()


def test_a_session_whose_account_is_deleted_or_cannot_be_checked_issues_nothing(tmp_path, ca):
    import base64 as b64
    from urllib.parse import urlsplit

    directory = Slapd(tmp_path / "slapd").start()
    try:
        for user in ("carol", "erin", "dave"):
            directory.add_user(user, f"{user}-pw-1", mail=f"{user}@example.com", groups=["staff"])
        s = LoginSite(tmp_path / "site", directory, ca, login={
            "saml": {"service_providers": [{"entity_id": "https://sp.example.test/", "idp_initiated": True,
                                            "acs_urls": ["https://sp.example.test/acs"],
                                            "attributes": {"groups": "groups"}}]},
            "wsfed": {"relying_parties": [{"realm": "urn:example:rp", "reply_urls": ["https://rp.example.test/"]}]}},
            extra={"ldap.yaml": "ldap: " + json.dumps({**directory.plugin_settings("plain"),
                                                       "groups": {"cache_ttl": 0}})})  # groups as they are now
        gw = s.start()
        idp = f"{s.url}/saml/idp?sp=https://sp.example.test/"
        wsfed = f"{s.url}/wsfed?wa=wsignin1.0&wtrealm=urn:example:rp"
        browsers = {user: s.client() for user in ("carol", "erin", "dave")}
        for user, browser in browsers.items():
            s.sign_in(browser, user, f"{user}-pw-1")
        # deleted: no SAML Response, no WS-Fed token; the session ends and the form is shown
        directory.delete(directory.user_dn("carol"))
        for url in (idp, wsfed):
            gone = browsers["carol"].get(url, allow_redirects=False)
            assert gone.status_code == 303 and urlsplit(gone.headers["Location"]).path == "/login", url
            assert "SAMLResponse" not in gone.text and "wresult" not in gone.text
            assert 'id="password"' in browsers["carol"].get(s.url + gone.headers["Location"]).text
        assert "the account of carol is gone" in gw.output()
        # the groups of an answer are those of the directory now, not of the sign-in
        directory.add_group("admins", [directory.user_dn("erin")])
        response = b64.b64decode(hidden(browsers["erin"].get(idp).text, "SAMLResponse")).decode()
        assert ">admins<" in response and ">staff<" in response
        # the directory cannot say: fail closed
        directory.stop()
        down = browsers["dave"].get(idp)
        assert down.status_code == 503 and "SAMLResponse" not in down.text
        assert "Sign-in is not available right now." in down.text
    finally:
        if "s" in locals():
            s.stop()
        directory.stop()
