"""Review of the login door's web layer, logout and signing keys, through a real ``authgw serve``
with slapd (and redis-server, headless Chromium where they matter):

- a validated OIDC authorization request that cannot be served now (the user's or the client
  address's budget spent, the session store down) is answered at its registered
  ``redirect_uri`` with ``error=temporarily_unavailable``, ``state`` and ``iss`` (RFC 6749
  section 4.1.2.1), never with an HTML page a ``prompt=none`` iframe cannot show; a
  ``redirect_uri`` not registered still gets the page, never a redirect;
- a registered return address with an internationalized host name is written into the CSP
  ``form-action`` as a browser serializes its origin (``xn--``), so Chromium lets the answer
  through (it blocked both the redirect after ``POST /login`` and the auto-posted answer), and
  a ``base_url`` with such a host behind a TLS-terminating proxy takes its own pages' posts
  (every sign-in was refused as ``login.cross_site``);
- a signing key that is not its certificate's (a rotation cut short between the two files)
  stops the start, and is refused at a reload, naming both files;
- ``GET /logout`` (and a refused ``POST``: a token that expired, a form on another site) shows a
  signed-in user the Sign out button, not the sign-in form, and ends nothing.

The first two tests need plugins/login/oidc.py to register its answer in
``LoginDoor.unavailable`` and to park a POSTed request through ``LoginDoor.wait_at_login``.

No assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import signal
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from support.browser import chromium
from support.login import LoginSite, hidden
from support.net import wait_for
from support.pki import CA
from support.recorder import Recorder
from support.redis import RedisServer
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
SECRET = "rp-secret-value-0123456789"
BUDGET = 3  # sessions.requests_per_client: small, so that it is spent in a few requests


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    yield server
    server.stop()


def oidc_site(base, slapd, redirect_uris, **sessions) -> LoginSite:
    secret = base / "secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(SECRET)
    secret.chmod(0o600)
    site = LoginSite(base / "op", slapd, CA.create(), login={
        "sessions": sessions,
        "oidc": {"clients": [{"client_id": "rp", "redirect_uris": redirect_uris, "client_secret": {"file": str(secret)}}]}})
    site.gw = site.start()
    return site


def authorize(site, redirect_uri: str = CB, **extra) -> str:
    challenge = base64.urlsafe_b64encode(hashlib.sha256(secrets.token_bytes(32)).digest()).decode().rstrip("=")
    params = {"response_type": "code", "client_id": "rp", "redirect_uri": redirect_uri, "scope": "openid",
              "state": "st-" + secrets.token_hex(4), "code_challenge": challenge, "code_challenge_method": "S256"}
    return f"{site.url}/oidc/authorize?" + urlencode({**params, **extra})


def error_at_callback(answer, site, url: str) -> None:
    """*answer* is the redirect of ``temporarily_unavailable`` to CB, with the request's state and iss."""
    assert answer.status_code == 303, (answer.status_code, answer.headers, answer.text[:300])
    location = answer.headers["Location"]
    assert location.startswith(CB + "?"), location
    fields = parse_qs(urlsplit(location).query)
    assert fields["error"] == ["temporarily_unavailable"], location
    assert fields["state"] == parse_qs(urlsplit(url).query)["state"] and fields["iss"] == [site.url], location
    assert "code" not in fields and answer.headers["Cache-Control"] == "no-store"


# -- 1. a validated request that cannot be served now ---------------------------------------------------------

def test_an_authorization_past_a_budget_is_answered_at_the_redirect_uri(tmp_path, slapd):
    site = oidc_site(tmp_path, slapd, [CB], requests_per_client=BUDGET)
    try:
        browser = site.client()
        first = browser.get(authorize(site), allow_redirects=False)  # parked: one of the address's tokens
        signed = site.sign_in(browser, "alice", "Alice-pw-1", url=site.url + first.headers["Location"],
                              allow_redirects=False)
        assert "code" in parse_qs(urlsplit(signed.headers["Location"]).query)
        for _ in range(BUDGET):  # answered from the session: the user's budget
            url = authorize(site, prompt="none")
            assert "code" in parse_qs(urlsplit(browser.get(url, allow_redirects=False).headers["Location"]).query)
        # The user's budget is spent: prompt=none (a silent renewal), and an interactive request.
        for extra in ({"prompt": "none"}, {}):
            url = authorize(site, **extra)
            spent = browser.get(url, allow_redirects=False)
            error_at_callback(spent, site, url)  # it was a 429 HTML page
            assert spent.headers["X-Refused-Reason"] == "login.too_many_requests"
        # form_post: the error is posted to the redirect_uri, as a code would be
        url = authorize(site, prompt="none", response_mode="form_post")
        posted = browser.get(url, allow_redirects=False)
        assert posted.status_code == 200 and re.search(r'<form method="post" action="([^"]+)"', posted.text)[1] == CB
        assert hidden(posted.text, "error") == "temporarily_unavailable" and hidden(posted.text, "code") is None
        assert hidden(posted.text, "state") == parse_qs(urlsplit(url).query)["state"][0]
        # A browser without a session, past its address's budget (the first request spent one)
        anonymous = site.client()
        for _ in range(BUDGET - 1):
            assert anonymous.get(authorize(site), allow_redirects=False).headers["Location"].startswith("/login?req=")
        url = authorize(site)
        error_at_callback(anonymous.get(url, allow_redirects=False), site, url)
        # a relying party's form posting the request (it is parked without a look at the session)
        url = authorize(site)
        posted = anonymous.post(f"{site.url}/oidc/authorize", data=parse_qs(urlsplit(url).query), allow_redirects=False)
        error_at_callback(posted, site, url)
        assert posted.headers["X-Refused-Reason"] == "login.too_many_requests" and int(posted.headers["Retry-After"]) >= 1
        # A redirect_uri that is not registered is never redirected to, budget or not
        stranger = anonymous.get(authorize(site, redirect_uri="https://evil.example.test/cb"), allow_redirects=False)
        assert stranger.status_code == 400 and "Location" not in stranger.headers
        assert "evil.example" not in stranger.text
        output = site.gw.output()
        assert "reason=login.too_many_requests user=alice" in output and "Traceback" not in output
    finally:
        site.stop()


def test_an_authorization_during_a_session_store_outage_is_answered_at_the_redirect_uri(tmp_path, slapd):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        site = oidc_site(tmp_path, slapd, [CB], store="redis", redis_url=redis.url)
        try:
            browser = site.client()
            first = browser.get(authorize(site), allow_redirects=False)
            site.sign_in(browser, "alice", "Alice-pw-1", url=site.url + first.headers["Location"],
                         allow_redirects=False)
            redis.stop()
            for client, extra in ((browser, {"prompt": "none"}), (browser, {}), (site.client(), {})):
                url = authorize(site, **extra)
                error_at_callback(client.get(url, allow_redirects=False), site, url)  # it was a 503 page
            # Without a validated return address it is still the page
            page = browser.get(f"{site.url}/login", allow_redirects=False)
            assert page.status_code == 503 and "Location" not in page.headers
            assert "login session store unavailable" in site.gw.output()
        finally:
            site.stop()
    finally:
        redis.stop()


# -- 2. internationalized host names in CSP ---------------------------------------------------------------------

IDN_HOST, IDN_ASCII = "bücher.example", "xn--bcher-kva.example"


def test_chromium_reaches_a_redirect_uri_with_an_internationalized_host(tmp_path, slapd):
    ca = CA.create()
    tls = ca.issue(IDN_ASCII, dns=[IDN_ASCII], server=True)
    relying = Recorder(tls, tmp_path)  # on 127.0.0.1
    callback = f"https://{IDN_HOST}:{relying.port}/cb"
    site = oidc_site(tmp_path, slapd, [callback])
    origin = f"https://{IDN_ASCII}:{relying.port}"
    try:
        # What the door writes: the origin as a browser serializes it (it left the address out)
        form = site.client().get(authorize(site, redirect_uri=callback))
        assert f"form-action 'self' {origin};" in form.headers["Content-Security-Policy"]
        with chromium(trust=[site.server_cert, tls],
                      args=[f"--host-resolver-rules=MAP {IDN_ASCII} 127.0.0.1"]) as browser:
            page = browser.new_page()
            blocked = []
            page.on("console", lambda message: blocked.append(message.text) if "form-action" in message.text else None)
            # query: POST /login answered with a 303 to the redirect_uri (form-action applies to it)
            page.goto(authorize(site, redirect_uri=callback))
            page.fill("#username", "alice")
            page.fill("#password", "Alice-pw-1")
            page.click("button[type=submit]")
            page.wait_for_url(lambda now: now.startswith(origin + "/cb?"), timeout=15000)
            assert "code" in parse_qs(urlsplit(page.url).query)
            # form_post: the auto-posting answer page (its form-action was 'none')
            answer = page.goto(authorize(site, redirect_uri=callback, response_mode="form_post"))
            assert f"form-action {origin};" in answer.headers["content-security-policy"]
            page.wait_for_url(origin + "/cb", timeout=15000)
            assert "POST /cb" in relying.hits and not blocked, (relying.hits, blocked)
    finally:
        relying.stop()
        site.stop()


def test_a_form_posted_from_an_internationalized_base_url_is_not_taken_for_another_sites(tmp_path, slapd):
    """``base_url`` with an IDN host, behind a proxy that terminates TLS (here the plain-http
    listener): the browser's ``Origin`` is the ``xn--`` form, which the door's own origin did
    not equal, so every sign-in was refused as ``login.cross_site``."""
    site = LoginSite(tmp_path / "idp", slapd, CA.create(), host="anmeldung." + IDN_HOST)
    site.gw = site.start()
    try:
        client = requests.Session()
        client.trust_env = False  # no proxy from the environment: 127.0.0.1 only
        form = client.get(f"{site.gw.url}/login", timeout=15)
        cookie = form.headers["Set-Cookie"].split(";")[0]  # a Secure cookie: sent here by hand
        origin = f"https://anmeldung.{IDN_ASCII}:{site.port}"
        answer = client.post(f"{site.gw.url}/login", timeout=15, headers={"Origin": origin, "Cookie": cookie},
                               data={"csrf": hidden(form.text, "csrf"), "username": "alice", "password": "Alice-pw-1"})
        assert answer.status_code == 200 and "signed in as Alice Liddell" in answer.text, answer.headers
        # another site's origin is still refused
        other = client.post(f"{site.gw.url}/login", timeout=15, headers={"Origin": "https://evil.example",
                                                                         "Cookie": cookie},
                              data={"csrf": hidden(form.text, "csrf"), "username": "alice", "password": "Alice-pw-1"})
        assert other.status_code == 403 and other.headers["X-Refused-Reason"] == "login.cross_site"
    finally:
        site.stop()


# -- 3. a key pair that does not match -------------------------------------------------------------------------

def cut_short_rotation(state) -> None:
    """A rotation that stopped after writing ``signing-current.key`` (the next key), before
    ``signing-current.crt``: the key is the next certificate's, the certificate the old one."""
    keys = state / "login"
    (keys / "signing-current.key").write_bytes((keys / "signing-next.key").read_bytes())


def test_a_signing_key_that_is_not_its_certificates_stops_the_start(tmp_path, slapd):
    site = LoginSite(tmp_path / "idp", slapd, CA.create())
    state = tmp_path / "state"
    try:
        site.start(state=state)
        site.stop()
        cut_short_rotation(state)
        with pytest.raises(Exception):  # it signed with the key the metadata did not publish
            site.start(state=state)
        output = site.processes[-1].output()
        keys = state / "login"
        assert (f"{keys / 'signing-current.key'} is not the key of {keys / 'signing-current.crt'}: it is the key of "
                "signing-next.crt") in output, output[-800:]
    finally:
        site.stop()


def test_a_reload_with_a_signing_key_that_is_not_its_certificates_is_refused(tmp_path, slapd):
    site = LoginSite(tmp_path / "idp", slapd, CA.create())
    gw = site.start()
    try:
        metadata = site.client().get(f"{site.url}/saml/metadata").text
        cut_short_rotation(gw.state_dir)
        os.kill(int((gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
        wait_for(lambda: " reloaded " in gw.output() or "reload refused" in gw.output(), 60, what="the reload",
                 log=gw.output)
        output = gw.output()
        assert "reload refused" in output and " reloaded " not in output, output[-800:]
        assert "signing-current.key is not the key of" in output
        # the running configuration stays, with its matching pair
        assert site.client().get(f"{site.url}/saml/metadata").text == metadata
    finally:
        site.stop()


# -- 4. GET /logout ------------------------------------------------------------------------------------------------

def test_get_logout_shows_a_signed_in_user_the_sign_out_button_and_ends_nothing(tmp_path, slapd):
    site = LoginSite(tmp_path / "idp", slapd, CA.create())
    site.gw = site.start()
    try:
        browser = site.client()
        assert "signed in as Alice Liddell" in site.sign_in(browser, "alice", "Alice-pw-1").text
        page = browser.get(f"{site.url}/logout")
        assert page.status_code == 200 and "signed in as Alice Liddell" in page.text, page.text[-400:]
        assert 'id="username"' not in page.text  # it was the sign-in form: "signed out", it seemed
        assert 'action="/logout"' in page.text and page.headers["Cache-Control"] == "no-store"
        assert "signed in as" in browser.get(f"{site.url}/login").text  # a GET ends nothing
        # a post whose token expired: refused, the button again, still signed in
        stale = browser.post(f"{site.url}/logout", data={"csrf": "expired-token"})
        assert stale.status_code == 403 and 'action="/logout"' in stale.text and 'id="username"' not in stale.text
        assert "signed in as" in browser.get(f"{site.url}/login").text
        # a form on another site: refused (login CSRF's twin), the button again
        foreign = browser.post(f"{site.url}/logout", data={"csrf": hidden(stale.text, "csrf")},
                               headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert foreign.status_code == 403 and foreign.headers["X-Refused-Reason"] == "login.cross_site"
        assert 'action="/logout"' in foreign.text and 'id="username"' not in foreign.text
        assert "signed in as" in browser.get(f"{site.url}/login").text
        # the button signs out
        out = browser.post(f"{site.url}/logout", data={"csrf": hidden(stale.text, "csrf")})
        assert out.status_code == 200 and "You are signed out." in out.text
        assert 'id="username"' in browser.get(f"{site.url}/login").text
        # without a session: the signed-out page
        again = browser.get(f"{site.url}/logout")
        assert again.status_code == 200 and "You are signed out." in again.text and 'action="/logout"' not in again.text
    finally:
        site.stop()
