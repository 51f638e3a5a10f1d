"""The ``/login`` password form and browser sessions, through a real ``authgw serve`` in front of
a real slapd (the AD account states played by slapd's retcode overlay)."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from support.login import LoginSite, hidden
from support.pki import CA
from support.redis import RedisServer
from support.slapd import Slapd

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
    assert cookie.startswith("authgw_csrf=") and "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie


def test_a_password_login_makes_a_secure_session_audited_like_auth(site):
    s = site()
    gw = s.start()
    browser = s.client()
    page = s.sign_in(browser, "alice", "Alice-pw-1")
    assert page.status_code == 200
    assert "You are signed in as Alice Liddell." in page.text
    session = next(c for c in page.headers["Set-Cookie"].split(", authgw") if "authgw_session=" in c or
                   c.startswith("_session="))
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
    victim.cookies.set("authgw_session", "attacker-chosen.value")
    first = s.sign_in(victim, "alice", "Alice-pw-1")
    issued = first.cookies.get("authgw_session")
    assert issued and not issued.startswith("attacker-chosen")
    # Signing in again rotates the id and ends the session the browser had.
    holder = s.client()
    holder.cookies.set("authgw_session", issued)
    assert "signed in as" in holder.get(f"{s.url}/login").text
    again = s.client()
    again.cookies.set("authgw_session", issued)
    second = s.sign_in(again, "alice", "Alice-pw-1")
    assert second.cookies.get("authgw_session") not in (None, issued)
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
