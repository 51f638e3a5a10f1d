"""Headless Chromium through the answers that are *redirects after a form submission*: OIDC
``response_mode=query`` (``POST /login`` answered with a 303 to the relying party's
``redirect_uri``) and SAML Single Logout by HTTP-Redirect from the Sign out button (``POST
/logout`` answered with a 303 to the SP's ``slo_url``). Chromium applies the form page's CSP
``form-action`` to those redirects, so the page must list exactly that origin besides ``'self'``.
The relying party and the SP are small HTTPS servers on 127.0.0.1 (another site than the door's
https://localhost) that record what reached them."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from support.browser import chromium
from support.login import LoginSite
from support.pki import CA
from support.recorder import Recorder
from support.slapd import Slapd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("csp-browser")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    ca = CA.create()
    tls = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    rp, sp = Recorder(tls, base), Recorder(tls, base)
    (base / "secret").write_text("rp-secret-value-0123456789")
    (base / "secret").chmod(0o600)
    site = LoginSite(base / "idp", slapd, ca, login={
        "oidc": {"clients": [{"client_id": "rp", "redirect_uris": [rp.url + "/cb"],
                              "client_secret": {"file": str(base / "secret")}}]},
        "saml": {"service_providers": [{"entity_id": sp.url + "/", "acs_urls": [sp.url + "/acs"], "idp_initiated": True,
                                        "slo_url": sp.url + "/slo", "slo_binding": "redirect"}]}})
    site.gw = site.start()
    yield site, rp, sp, [site.server_cert, tls]
    rp.stop()
    sp.stop()
    site.stop()
    slapd.stop()


def sign_in(page) -> None:
    page.fill("#username", "alice")
    page.fill("#password", "Alice-pw-1")
    page.click("button[type=submit]")


def test_chromium_follows_the_oidc_query_answer_to_the_redirect_uri(world):
    site, rp, sp, trust = world
    challenge = base64.urlsafe_b64encode(hashlib.sha256(secrets.token_bytes(32)).digest()).decode().rstrip("=")
    url = f"{site.url}/oidc/authorize?" + urlencode({
        "client_id": "rp", "redirect_uri": rp.url + "/cb", "response_type": "code", "scope": "openid",
        "code_challenge": challenge, "code_challenge_method": "S256", "state": "st-q"})
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        blocked = []
        page.on("console", lambda message: blocked.append(message.text) if "form-action" in message.text else None)
        form = page.goto(url)
        csp = form.headers["content-security-policy"]
        assert f"form-action 'self' {rp.url};" in csp  # that origin only, on this page only
        sign_in(page)
        page.wait_for_url(lambda now: now.startswith(rp.url + "/cb"), timeout=15000)
        query = parse_qs(urlsplit(page.url).query)
        assert query["state"] == ["st-q"] and query["code"] and not blocked
        assert [path for path in rp.paths() if path.startswith("/cb?")]
        # The plain form (no pending request) still admits no other origin.
        plain = browser.new_page().goto(f"{site.url}/login")
        assert "form-action 'self';" in plain.headers["content-security-policy"]


def test_chromium_sign_out_reaches_the_sp_by_http_redirect(world):
    site, rp, sp, trust = world
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        page.goto(f"{site.url}/saml/idp?" + urlencode({"sp": sp.url + "/"}))
        sign_in(page)
        page.wait_for_url(sp.url + "/acs", timeout=15000)  # the assertion was posted to the SP
        signed_in = page.goto(f"{site.url}/login")
        assert f"form-action 'self' {sp.url};" in signed_in.headers["content-security-policy"]
        page.click("button[type=submit]")  # Sign out
        page.wait_for_url(lambda now: now.startswith(sp.url + "/slo?"), timeout=15000)
        assert "SAMLRequest" in parse_qs(urlsplit(page.url).query)
        page.goto(f"{site.url}/login")
        assert page.locator("#username").count() == 1  # the session ended: the form again
