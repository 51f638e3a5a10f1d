"""A NameID comes from the field ``name_id_source`` names, or is not issued: an account with no
``mail`` whose user name is someone else's address (``alice@example.com``) must not get alice's
``emailAddress`` NameID (the same account at the service). SAML answers the error status
``Responder`` / ``InvalidNameIDPolicy`` with no assertion, WS-Federation the error page with no
token, and the log names the user and the missing field. Through a real ``authgw serve`` and
slapd; the SAML SP is pysaml2 (it verifies the error Response's signature before it reads the
status)."""

from __future__ import annotations

import base64
import re

import pytest
from saml2.response import StatusInvalidNameidPolicy

from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

ACS = "https://sp.example.test/acs"
SP_ID = "https://sp.example.test/"
REALM = "urn:example:wsfed"
REPLY = "https://rp.example.test/wsfed"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    base = tmp_path_factory.mktemp("name-id-source")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    slapd.add_user("alice@example.com", "Mallory-pw-1", cn="Mallory")  # no mail; a name like alice's address
    # values XML cannot carry (a vertical tab, a SOH): lxml raised while the answer was built
    slapd.add_user("bob", "Bob-pw-1", cn="Bob \x0b Builder", mail="bob@example.com")
    slapd.add_user("dave", "Dave-pw-1", cn="Dave", mail="dave\x01@example.com")
    mapped = {"displayName": "display_name"}
    site = LoginSite(base / "idp", slapd, CA.create(), login={
        "saml": {"service_providers": [{"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress",
                                        "name_id_source": "email", "attributes": mapped}]},
        "wsfed": {"relying_parties": [{"realm": REALM, "reply_urls": [REPLY], "name_id_format": "emailAddress",
                                       "name_id_source": "email", "attributes": mapped}]}})
    site.gw = site.start()
    site.metadata = site.client().get(f"{site.url}/saml/metadata").text
    yield site
    site.stop()
    slapd.stop()


@pytest.fixture(scope="module")
def sp(idp, tmp_path_factory):
    return SamlSP(tmp_path_factory.mktemp("sp"), idp.metadata, acs=ACS, entity_id=SP_ID)


def saml_answer(idp, sp, user: str, password: str):
    browser = idp.client()
    request_id, location = sp.redirect_request(relay_state="rs")
    page = idp.sign_in(browser, user, password, url=browser.get(location).url)
    assert re.search(r'<form method="post" action="([^"]+)"', page.text).group(1) == ACS
    return page, request_id, browser


def test_saml_issues_no_name_id_when_its_source_is_empty(idp, sp):
    page, request_id, browser = saml_answer(idp, sp, "alice@example.com", "Mallory-pw-1")
    assert page.headers["X-Refused-Reason"] == "saml.name_id_unavailable"
    response = hidden(page.text, "SAMLResponse")
    with pytest.raises(StatusInvalidNameidPolicy):
        sp.accept(response, request_id)
    xml = base64.b64decode(response).decode()
    assert re.search(rf'<samlp:StatusCode Value="{STATUS}Responder">\s*'
                     rf'<samlp:StatusCode Value="{STATUS}InvalidNameIDPolicy"/>', xml)
    assert "Assertion" not in xml and "alice@example.com" not in xml and hidden(page.text, "RelayState") == "rs"
    assert "reason=saml.name_id_unavailable" in idp.gw.output()
    assert "user alice@example.com has no email (name_id_source)" in idp.gw.output()
    # the session stays, and answers nothing either
    request_id, location = sp.redirect_request()
    again = browser.get(location)
    assert again.headers["X-Refused-Reason"] == "saml.name_id_unavailable"
    # alice, who has the mail, gets her NameID
    page, request_id, _ = saml_answer(idp, sp, "alice", "Alice-pw-1")
    assert sp.accept(hidden(page.text, "SAMLResponse"), request_id).name_id == "alice@example.com"


def test_ws_federation_issues_no_token_when_the_name_id_source_is_empty(idp):
    browser = idp.client()
    params = {"wa": "wsignin1.0", "wtrealm": REALM, "wctx": "c"}
    form = browser.get(f"{idp.url}/wsfed", params=params)
    page = idp.sign_in(browser, "alice@example.com", "Mallory-pw-1", url=form.url)
    assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "wsfed.name_id_unavailable"
    assert "wresult" not in page.text and REPLY not in page.text
    assert "reason=wsfed.name_id_unavailable" in idp.gw.output()
    assert "user alice@example.com has no email (name_id_source)" in idp.gw.output()
    # alice's token names her by her mail
    browser = idp.client()
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(f"{idp.url}/wsfed", params=params).url)
    wresult = hidden(page.text, "wresult")
    assert re.search(r'Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"[^>]*>alice@example.com<',
                     wresult)


def test_a_directory_value_xml_cannot_carry_is_never_a_500(idp, sp):
    """Review of the login door: a display name with a control character made every SAML and
    WS-Federation answer for that user a 500, after the session was made. An attribute's value
    is now sent with U+FFFD in the character's place; a NameID is not sent altered (another
    identifier could be another account's): no NameID, as for an empty source."""
    page, request_id, _ = saml_answer(idp, sp, "bob", "Bob-pw-1")
    result = sp.accept(hidden(page.text, "SAMLResponse"), request_id)
    assert (result.name_id, result.attributes["displayName"]) == ("bob@example.com", ["Bob \ufffd Builder"])
    browser = idp.client()
    params = {"wa": "wsignin1.0", "wtrealm": REALM}
    page = idp.sign_in(browser, "bob", "Bob-pw-1", url=browser.get(f"{idp.url}/wsfed", params=params).url)
    assert page.status_code == 200 and "Bob \ufffd Builder" in hidden(page.text, "wresult")

    page, request_id, _ = saml_answer(idp, sp, "dave", "Dave-pw-1")
    assert page.headers["X-Refused-Reason"] == "saml.name_id_unavailable"
    with pytest.raises(StatusInvalidNameidPolicy):
        sp.accept(hidden(page.text, "SAMLResponse"), request_id)
    browser = idp.client()
    page = idp.sign_in(browser, "dave", "Dave-pw-1", url=browser.get(f"{idp.url}/wsfed", params=params).url)
    assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "wsfed.name_id_unavailable"
    assert "the email of dave holds a character XML cannot carry" in idp.gw.output()
    assert "Traceback" not in idp.gw.output() and "a request handler raised" not in idp.gw.output()
