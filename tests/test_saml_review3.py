"""Third review of the login door's XML protocols (SAML 2.0 IdP, WS-Federation, SAML Single
Logout): each finding reproduced through a real ``authgw serve`` in front of slapd, with pysaml2
as the SP (it makes and signs the requests, and checks authgw's answers with ``xmlsec1``)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import SamlSP, rsa_pair
from support.slapd import Slapd

SIGNED = "https://signed.example.test/"
ACS, SLO = SIGNED + "acs", SIGNED + "slo"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("saml-review3")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    slapd.add_user("bob", "Bob-pw-1", mail="bob@example.com")
    keys = rsa_pair(base / "sp", "signed", "signed.example.test")
    login = LoginSite(base / "idp", slapd, CA.create(), login={"saml": {"service_providers": [
        {"entity_id": SIGNED, "acs_urls": [ACS], "slo_url": SLO, "request_certificate": str(keys[0])}]}})
    login.gw = login.start()
    login.sp = SamlSP(base / "pysaml2", login.client().get(f"{login.url}/saml/metadata").text, acs=ACS,
                      entity_id=SIGNED, keys=keys, slo=SLO, sign_requests=True, sign_logout=True)
    yield login
    login.stop()
    slapd.stop()


def sso(site, browser, user: str, password: str):
    """*user* signs in at the SP through *browser*: pysaml2's checked Result."""
    request_id, location = site.sp.redirect_request()
    page = browser.get(location)
    if urlsplit(page.url).path == "/login":
        page = site.sign_in(browser, user, password, url=page.url)
    return site.sp.accept(hidden(page.text, "SAMLResponse"), request_id)


def signed_in(site, browser) -> bool:
    return "signed in as" in browser.get(f"{site.url}/login").text


def signed_logout_url(site, result) -> str:
    """The SP's signed LogoutRequest for *result* by HTTP-Redirect: the URL the SP sends the
    browser of whoever signed out there to."""
    _, info = site.sp.logout_request(f"{site.url}/saml/slo", result)
    location = dict(info["headers"])["Location"]
    assert "Signature=" in location
    return location


# -- Single Logout: a signed LogoutRequest ends only its own user's session --------------------------


def test_a_signed_logout_request_for_another_user_leaves_the_browsers_session(site):
    # Bob signs out at the SP, which sends his browser to the IdP with a LogoutRequest it signed
    # for bob. Bob does not follow it: he makes alice's browser follow it (a link, a top-level
    # navigation: her SameSite=Lax cookie comes along). It verified, and it ended alice's whole
    # session, whether the SP had an assertion in it or not.
    attacker = site.client()
    at_sp = site.client()  # alice, signed in at the SP in this session
    elsewhere = site.client()  # alice, signed in at the door only (her SP session is older)
    bob = sso(site, attacker, "bob", "Bob-pw-1")
    alice = sso(site, at_sp, "alice", "Alice-pw-1")
    site.sign_in(elsewhere, "alice", "Alice-pw-1")
    for victim in (at_sp, elsewhere):
        page = victim.get(signed_logout_url(site, bob), headers={"Sec-Fetch-Site": "cross-site"})
        # answered (a LogoutResponse to the SP's registered slo_url), and alice is still signed in
        assert re.search(r'<form method="post" action="([^"]+)"', page.text).group(1) == SLO
        assert "authgw_session=" not in page.headers.get("Set-Cookie", "")
        assert signed_in(site, victim)
    assert "a signed LogoutRequest from https://signed.example.test/ did not name the browser's own" in site.gw.output()
    # The SP's signed request for alice herself still ends her session: with another
    # SessionIndex where the SP got an assertion, and where it got none (the NameID it would get).
    for victim in (at_sp, elsewhere):
        other_index = alice.__class__(**{**alice.__dict__, "session_index": "another"})
        victim.get(signed_logout_url(site, other_index))
        assert not signed_in(site, victim)
