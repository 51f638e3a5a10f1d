"""An unsigned SAML LogoutRequest (an SP without ``request_certificate``, or with ``signed_logout:
false``) is a cross-site GET any page can make: it ends the browser's own authgw session only
when it names that session (the NameID this SP was issued in it and its SessionIndex), never
because the browser's cookie came along; a signed one that verified still ends it. The SPs are
pysaml2 (they make the LogoutRequests, signed or not, and check authgw's answers); the browser a
cookie-keeping HTTP client through a real ``authgw serve`` and slapd."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from saml2 import BINDING_HTTP_REDIRECT
from saml2.saml import NameID

from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import SamlSP, rsa_pair
from support.slapd import Slapd

OPEN, LAX = "https://open.example.test/", "https://lax.example.test/"
CALLBACK, SECRET = "https://rp.example.test/callback", "rp-secret-value-0123456789"
ACS = {sp: sp + "acs" for sp in (OPEN, LAX)}
SLO = {sp: sp + "slo" for sp in (OPEN, LAX)}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("slo-unsigned")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    lax_keys = rsa_pair(base / "sp", "lax", "lax.example.test")
    (base / "secret").write_text(SECRET)
    (base / "secret").chmod(0o600)
    login = LoginSite(base / "idp", slapd, CA.create(), login={"oidc": {"clients": [
        {"client_id": "rp", "redirect_uris": [CALLBACK], "client_secret": {"file": str(base / "secret")}}]},
        "saml": {"service_providers": [
        # no request_certificate: its LogoutRequests are unsigned
        {"entity_id": OPEN, "acs_urls": [ACS[OPEN]], "slo_url": SLO[OPEN], "name_id_format": "emailAddress",
         "name_id_source": "email"},
        # a request_certificate, but signed_logout: false takes an unsigned LogoutRequest too
        {"entity_id": LAX, "acs_urls": [ACS[LAX]], "slo_url": SLO[LAX], "name_id_format": "persistent",
         "request_certificate": str(lax_keys[0]), "signed_logout": False}]}})
    login.gw = login.start()
    login.metadata = login.client().get(f"{login.url}/saml/metadata").text
    login.lax_keys = lax_keys
    yield login
    login.stop()
    slapd.stop()


def make_sp(site, tmp_path, entity_id: str, sign: bool) -> SamlSP:
    keys = site.lax_keys if entity_id == LAX else None
    return SamlSP(tmp_path / urlsplit(entity_id).hostname / str(sign), site.metadata, acs=ACS[entity_id],
                  entity_id=entity_id, slo=SLO[entity_id], keys=keys, sign_logout=sign, sign_requests=entity_id == LAX)


def sso(site, sp: SamlSP, browser):
    request_id, location = sp.redirect_request()
    page = browser.get(location)
    if urlsplit(page.url).path == "/login":
        page = site.sign_in(browser, "alice", "Alice-pw-1", url=page.url)
    return sp.accept(hidden(page.text, "SAMLResponse"), request_id)


def signed_in(site, browser) -> bool:
    return "signed in as" in browser.get(f"{site.url}/login").text


def logout(site, browser, sp: SamlSP, result, **changes):
    """*sp*'s LogoutRequest for *result* (with *changes*: another NameID or SessionIndex), sent
    by HTTP-Redirect as a cross-site page would make the browser send it."""
    location = unsigned_logout_request(site, sp, result.__class__(**{**result.__dict__, **changes}))
    page = browser.get(location, headers={"Sec-Fetch-Site": "cross-site"})
    # answered at the SP's registered slo_url (a LogoutResponse), whatever it named
    assert re.search(r'<form method="post" action="([^"]+)"', page.text).group(1) == SLO[sp.entity_id]
    return page


def unsigned_logout_request(site, sp: SamlSP, result) -> str:
    """pysaml2's LogoutRequest for *result* by HTTP-Redirect, unsigned (``sign=False``: pysaml2
    would otherwise sign the query of an SP that signs its AuthnRequests)."""
    destination = f"{site.url}/saml/slo"
    _, request = sp.client.create_logout_request(
        destination, sp.idp, name_id=NameID(text=result.name_id, format=result.name_id_format),
        session_indexes=[result.session_index], sign=False)
    info = sp.client.apply_binding(BINDING_HTTP_REDIRECT, str(request), destination, sign=False)
    location = dict(info["headers"])["Location"]
    assert "Signature=" not in location
    return location


@pytest.mark.parametrize("entity_id", [OPEN, LAX])
def test_an_unsigned_logout_request_naming_nothing_of_this_browser_leaves_its_session(site, tmp_path, entity_id):
    sp = make_sp(site, tmp_path, entity_id, sign=False)
    browser = site.client()
    result = sso(site, sp, browser)
    for changes in ({"name_id": "nobody", "session_index": "bogus"},  # the review's probe
                    {"session_index": "bogus"},                       # the user's NameID is no secret
                    {"name_id": "nobody"}):                           # nor is it enough to have the index
        page = logout(site, browser, sp, result, **changes)
        assert "authgw_session" not in page.headers.get("Set-Cookie", ""), changes  # the cookie is not dropped
        assert signed_in(site, browser), changes
    assert "did not name the browser's own session; it stays" in site.gw.output()
    # the request that names this browser's session (as issued to this SP) ends it
    page = logout(site, browser, sp, result)
    assert "authgw_session=" in page.headers.get("Set-Cookie", "")
    assert not signed_in(site, browser)


def test_a_signed_logout_request_that_verifies_ends_the_browsers_session(site, tmp_path):
    sp = make_sp(site, tmp_path, LAX, sign=True)
    browser = site.client()
    result = sso(site, sp, browser)
    _, info = sp.logout_request(f"{site.url}/saml/slo", result.__class__(**{**result.__dict__,
                                                                          "session_index": "another"}))
    location = dict(info["headers"])["Location"]
    assert "Signature=" in location
    browser.get(location)
    assert not signed_in(site, browser)


def test_an_id_tokens_sid_names_no_session_at_the_saml_logout(site, tmp_path):
    """Review of the login door: an id_token's ``sid`` was the session's SAML SessionIndex, and its
    ``email`` the NameID an SP is issued: anyone holding one of a user's id_tokens (logout URLs,
    history, a relying party's logs) forged an unsigned LogoutRequest in an SP's name and ended
    that user's whole session from a client with no cookie. Each client now gets its own sid."""
    import base64
    import hashlib
    import json
    import secrets
    from urllib.parse import parse_qs, urlencode

    sp = make_sp(site, tmp_path, OPEN, sign=False)
    victim = site.client()
    result = sso(site, sp, victim)
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    authorized = victim.get(f"{site.url}/oidc/authorize?" + urlencode({
        "client_id": "rp", "redirect_uri": CALLBACK, "response_type": "code", "scope": "openid email",
        "code_challenge": challenge, "code_challenge_method": "S256"}), allow_redirects=False)
    code = parse_qs(urlsplit(authorized.headers["Location"]).query)["code"][0]
    tokens = site.client().post(f"{site.url}/oidc/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier},
        auth=("rp", SECRET)).json()
    payload = tokens["id_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["email"] == result.name_id and claims["sid"] and claims["sid"] != result.session_index

    forged = unsigned_logout_request(site, sp, result.__class__(**{**result.__dict__, "session_index": claims["sid"]}))
    site.client().get(forged)  # no cookie: the id_token's holder, not the victim's browser
    assert signed_in(site, victim)
    # the id_token still names its session as its client knows it: a logout hint ends it there
    ended = victim.get(f"{site.url}/oidc/logout?" + urlencode({"id_token_hint": tokens["id_token"]}))
    assert ended.status_code == 200 and not signed_in(site, victim)


def test_a_session_index_told_to_one_sp_ends_nothing_in_another_sps_name(site, tmp_path):
    """Every SP (and WS-Federation relying party) was told the session's one SessionIndex: whoever
    held any of a user's assertions (here LAX's) forged an unsigned LogoutRequest as OPEN, whose
    NameID (the mail) is no secret, ended the user's whole session from a browser without its
    cookie, and drove the logout round of the other SPs (review of the login door). Each party is
    told its own; the SLO endpoint takes only the one told to the SP that asks."""
    open_sp, lax_sp = make_sp(site, tmp_path, OPEN, sign=False), make_sp(site, tmp_path, LAX, sign=False)
    victim = site.client()
    at_open = sso(site, open_sp, victim)
    at_lax = sso(site, lax_sp, victim)
    assert at_open.session_index != at_lax.session_index
    forged = {**at_open.__dict__, "session_index": at_lax.session_index}
    site.client().get(unsigned_logout_request(site, open_sp, at_open.__class__(**forged)))
    assert signed_in(site, victim)
    assert "named a session it has no part in; it stays" in site.gw.output()
    # Nor does WS-Federation's sign-out, a GET any page can send, on a door with no relying party
    refused = victim.get(f"{site.url}/wsfed?wa=wsignout1.0", headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 400 and signed_in(site, victim)
    site.client().get(unsigned_logout_request(site, open_sp, at_open))  # OPEN's own index: its logout
    assert not signed_in(site, victim)
