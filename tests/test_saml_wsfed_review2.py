"""Second review of the login door's XML protocols (SAML 2.0 IdP, WS-Federation, SAML Single
Logout): each finding reproduced through a real ``authgw serve`` in front of slapd, with pysaml2
as the SP (its signatures and checks by ``xmlsec1``) and headless Chromium where what a browser
sends decides (``SameSite`` cookies on a cross-site POST)."""

from __future__ import annotations

import base64
import datetime as dt
import glob
import html
import os
import secrets
import zlib
from urllib.parse import urlencode

import pytest

from support.browser import SamlSPServer, chromium
from support.login import LoginSite
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

SP_ID = "https://sp.example.test/"
SAMLP = 'xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion"'


class PassiveSP(SamlSPServer):
    """The SP of tests/support/browser.py, and ``GET /post?is_passive=..&force_authn=..``: a page
    that posts an AuthnRequest to the IdP (HTTP-POST binding) on load, as SPs that sign their
    requests do; the browser arrives at the IdP with a cross-site POST."""

    def __init__(self, *args, idp_sso: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.idp_sso = idp_sso

    def answer_get(self, path: str) -> tuple[int, str, dict]:
        if path.startswith("/post"):
            flags = dict(part.split("=", 1) for part in path.partition("?")[2].split("&") if "=" in part)
            request_id, fields = self.sp.post_request(relay_state="/passive", **flags)
            self.outstanding[request_id] = "/passive"
            inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                             for k, v in fields.items())
            return 200, (f'<form method="post" action="{html.escape(self.idp_sso)}">{inputs}</form>'
                         "<script>document.forms[0].submit()</script>"), {}
        return super().answer_get(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("saml-review2")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    ca = CA.create()
    acs = SamlSPServer.free_acs()
    site = LoginSite(base / "idp", slapd, ca, login={"saml": {"service_providers": [
        {"entity_id": SP_ID, "acs_urls": [acs], "name_id_format": "emailAddress", "name_id_source": "email"}]}})
    site.gw = site.start()
    site.acs = acs
    metadata = site.client().get(f"{site.url}/saml/metadata").text
    sp_cert = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True)
    server = PassiveSP(SamlSP(base / "sp", metadata, acs=acs, entity_id=SP_ID), sp_cert, base / "sp",
                       idp_sso=f"{site.url}/saml/sso").start()
    yield site, server, [site.server_cert, sp_cert]
    server.stop()
    site.stop()
    slapd.stop()


def no_5xx_since(site, mark: int) -> None:
    output = site.gw.output()[mark:]
    assert "Traceback" not in output and "a request handler raised" not in output, output[-2000:]


# -- IsPassive by the HTTP-POST binding ------------------------------------------------------------


def test_is_passive_by_http_post_is_answered_from_the_session_a_cross_site_post_does_not_carry(world):
    # An SP's page posts the AuthnRequest to /saml/sso: a cross-site POST, so the browser does not
    # send the SameSite=Lax session cookie with it. The request was answered there as if there were
    # no session: IsPassive got NoPassive from a user who was signed in, so passive single sign-on
    # by HTTP-POST never worked. It now waits at /login (a GET, which gets the cookie), where the
    # session answers it, or NoPassive is answered; no page is shown either way.
    site, sp, trust = world
    mark = len(site.gw.output())
    with chromium(trust=trust) as browser:
        page = browser.new_page()
        seen: list[str] = []
        page.on("framenavigated", lambda frame: seen.append(frame.url) if frame == page.main_frame else None)
        # Not signed in: NoPassive, and no form on the way.
        page.goto(f"{sp.url}/post?is_passive=true")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert "NoPassive" in page.inner_text("#refused"), page.content()
        assert not [url for url in seen if url.startswith(f"{site.url}/login") and "password" in url]
        # Signed in (the redirect binding and the form), then passive by HTTP-POST: an assertion.
        page.goto(f"{sp.url}/start")
        page.fill("#username", "alice")
        page.fill("#password", "Alice-pw-1")
        page.click("button[type=submit]")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"
        seen.clear()
        page.goto(f"{sp.url}/post?is_passive=true")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.query_selector("#hello") is not None, page.content()
        assert page.inner_text("h1") == "Hello alice@example.com" and page.inner_text("#relay") == "/passive"
        # A plain HTTP-POST request is answered from the session as well, and ForceAuthn with
        # IsPassive is NoPassive however the request came: no form is ever shown for IsPassive.
        page.goto(f"{sp.url}/post")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert page.inner_text("h1") == "Hello alice@example.com"
        page.goto(f"{sp.url}/post?is_passive=true&force_authn=true")
        page.wait_for_selector("#hello, #refused", timeout=15000)
        assert "NoPassive" in page.inner_text("#refused"), page.content()
        assert page.query_selector("#password") is None
    no_5xx_since(site, mark)


# -- what a parked request may hold ------------------------------------------------------------------


def _authn_request(site, body: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    xml = (f'<samlp:AuthnRequest {SAMLP} ID="_{secrets.token_hex(10)}" Version="2.0" IssueInstant="{now}" '
           f'AssertionConsumerServiceURL="{site.acs}" Destination="{site.url}/saml/sso">'
           f'<saml:Issuer>{SP_ID}</saml:Issuer>{body}</samlp:AuthnRequest>').encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return base64.b64encode(packer.compress(xml) + packer.flush()).decode()


def _store_bytes(site) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(str(site.dir / "state*" / "login" / "sessions.sqlite3*")))


def test_a_subject_name_id_no_user_can_have_is_refused_before_anything_is_parked(world):
    # A request without a session is parked in the session store until the sign-in, its
    # <saml:Subject> with it. The NameID's length was not bounded: 250,000 characters deflate to
    # 750 bytes of query, and each such request (anyone's, no credential) stored a 250 KB record:
    # 30 from one address (its budget) grew the SQLite store by 7.9 MB, and sessions.max_pending
    # (20,000) let 5 GB be parked, in Redis's memory too. Refused now, before anything is stored.
    site, _sp, _trust = world
    mark = len(site.gw.output())
    browser = site.client()
    before = _store_bytes(site)
    for _ in range(5):
        query = urlencode({"SAMLRequest": _authn_request(
            site, f'<saml:Subject><saml:NameID>{"a" * 250_000}@example.com</saml:NameID></saml:Subject>')})
        assert len(query) < 1000
        page = browser.get(f"{site.url}/saml/sso?{query}", allow_redirects=False)
        assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "saml.subject_unsupported", \
            (page.status_code, page.headers.get("Location"))
    assert _store_bytes(site) - before < 250_000
    # A NameID of an ordinary length is parked as before, and answered once its user signs in.
    query = urlencode({"SAMLRequest": _authn_request(
        site, '<saml:Subject><saml:NameID>alice@example.com</saml:NameID></saml:Subject>')})
    page = browser.get(f"{site.url}/saml/sso?{query}", allow_redirects=False)
    assert page.status_code == 303 and page.headers["Location"].startswith("/login?req=")
    answer = site.sign_in(browser, "alice", "Alice-pw-1", url=site.url + page.headers["Location"])
    assert answer.status_code == 200 and 'name="SAMLResponse"' in answer.text
    assert "X-Refused-Reason" not in answer.headers
    no_5xx_since(site, mark)
