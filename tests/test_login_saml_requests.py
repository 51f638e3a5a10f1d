"""What an AuthnRequest asks for beyond a sign-in (SAML core 3.4.1): ``IsPassive``, a
``<saml:Subject>``, a ``NameIDPolicy`` Format, and the NameFormat of the attributes sent back.
The SP is pysaml2 (tests/support/saml_sp.py): it checks the error Responses' signatures (with
``xmlsec1``), Destination, InResponseTo and Issuer before it reads their status, and raises the
status as an exception. The browser is a cookie-keeping HTTP client through a real ``authgw
serve`` and slapd."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest
from saml2.response import StatusInvalidNameidPolicy, StatusNoPassive, StatusUnknownPrincipal
from saml2.saml import NAMEID_FORMAT_EMAILADDRESS, NAMEID_FORMAT_PERSISTENT, NameID, Subject

from support.login import LoginSite, hidden, unsigned_authn_request
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

ACS = "https://sp.example.test/acs"
SP_ID = "https://sp.example.test/"
URI_SP = "https://uri.example.test/"
URI_ACS = "https://uri.example.test/acs"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
UPN = "http://schemas.xmlsoap.org/claims/UPN"
MAIL_OID = "urn:oid:0.9.2342.19200300.100.1.3"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-pw-1", cn="Bob Builder", mail="bob@example.com", groups=["staff"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idp(tmp_path_factory, slapd):
    directory = tmp_path_factory.mktemp("idp")
    site = LoginSite(directory, slapd, CA.create(), login={"saml": {"service_providers": [
        {"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress", "name_id_source": "email",
         "attributes": {"uid": "username"}},
        {"entity_id": URI_SP, "acs_urls": [URI_ACS], "name_id_format": "persistent", "name_id_source": "username",
         "attributes": {UPN: "username", MAIL_OID: "email", "uid": "username"}}]}})
    site.gw = site.start()
    site.metadata = site.client().get(f"{site.url}/saml/metadata").text
    yield site
    site.stop()


@pytest.fixture(scope="module")
def sp(idp, tmp_path_factory):
    return SamlSP(tmp_path_factory.mktemp("sp"), idp.metadata, acs=ACS, entity_id=SP_ID)


def answer(page) -> tuple[str, dict[str, str]]:
    """The auto-post form's target and fields."""
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    return action, {name: hidden(page.text, name) for name in ("SAMLResponse", "RelayState") if hidden(page.text, name)}


def error_answer(sp, page, request_id: str, error: type[Exception], top: str, second: str,
                 relay_state: str | None = None) -> str:
    """The error Response *page* posts to the ACS: pysaml2 verifies it (signature, Destination,
    InResponseTo, Issuer) and raises its second-level status as *error*; it carries the
    top-level and second-level codes and no assertion. Returns its XML."""
    action, fields = answer(page)
    assert action == ACS and fields.get("RelayState") == relay_state
    with pytest.raises(error):
        sp.accept(fields["SAMLResponse"], request_id)
    xml = base64.b64decode(fields["SAMLResponse"]).decode()
    assert re.search(rf'<samlp:StatusCode Value="{STATUS}{top}">\s*<samlp:StatusCode Value="{STATUS}{second}"/>', xml)
    assert "Assertion" not in xml and f'InResponseTo="{request_id}"' in xml and f'Destination="{ACS}"' in xml
    assert "<ds:Signature" in xml  # sign_response (the default): signed as Success Responses are
    # pysaml2 checked that signature before it read the status: a changed message is refused as such.
    tampered = base64.b64encode(xml.replace("<samlp:StatusMessage>", "<samlp:StatusMessage>x").encode()).decode()
    with pytest.raises(Exception) as refused:
        sp.accept(tampered, request_id)
    assert not isinstance(refused.value, error)
    return xml


def signed_in(idp, sp, browser, username="alice", password="Alice-pw-1") -> str:
    request_id, location = sp.redirect_request()
    form = browser.get(location)
    page = idp.sign_in(browser, username, password, url=form.url)
    return sp.accept(answer(page)[1]["SAMLResponse"], request_id).name_id


def email_subject(value: str) -> Subject:
    return Subject(name_id=NameID(text=value, format=NAMEID_FORMAT_EMAILADDRESS))


def test_is_passive_without_a_session_is_answered_no_passive_and_shows_no_page(idp, sp):
    browser = idp.client()
    request_id, location = sp.redirect_request(relay_state="rs-1", is_passive="true")
    page = browser.get(location)
    assert urlsplit(page.url).path == "/saml/sso" and not page.history  # no redirect to the form
    assert 'id="password"' not in page.text and page.headers["X-Refused-Reason"] == "saml.no_passive"
    error_answer(sp, page, request_id, StatusNoPassive, "Responder", "NoPassive", relay_state="rs-1")
    # With a session that may answer, IsPassive is answered from it (nothing shown either).
    assert signed_in(idp, sp, browser) == "alice@example.com"
    request_id, location = sp.redirect_request(is_passive="true")
    assert sp.accept(answer(browser.get(location))[1]["SAMLResponse"], request_id).name_id == "alice@example.com"


def test_is_passive_with_force_authn_is_no_passive_despite_the_session(idp, sp):
    browser = idp.client()
    signed_in(idp, sp, browser)
    request_id, location = sp.redirect_request(is_passive="true", force_authn="true")
    page = browser.get(location)
    assert 'id="password"' not in page.text
    error_answer(sp, page, request_id, StatusNoPassive, "Responder", "NoPassive")


def test_a_subject_naming_another_user_gets_unknown_principal_never_an_assertion(idp, sp):
    browser = idp.client()
    assert signed_in(idp, sp, browser) == "alice@example.com"
    # alice's live session, a request for bob: refused, no assertion for alice.
    request_id, location = sp.redirect_request(subject=email_subject("bob@example.com"))
    page = browser.get(location)
    assert page.headers["X-Refused-Reason"] == "saml.subject_mismatch"
    xml = error_answer(sp, page, request_id, StatusUnknownPrincipal, "Responder", "UnknownPrincipal")
    assert "alice" not in xml
    # The same Subject as the session's user (the Format the SP is given, or none): answered.
    request_id, location = sp.redirect_request(subject=email_subject("alice@example.com"))
    assert sp.accept(answer(browser.get(location))[1]["SAMLResponse"], request_id).name_id == "alice@example.com"
    request_id, location = sp.redirect_request(subject=Subject(name_id=NameID(text="alice@example.com")))
    assert sp.accept(answer(browser.get(location))[1]["SAMLResponse"], request_id).name_id == "alice@example.com"
    qualified = NameID(text="alice@example.com", format=NAMEID_FORMAT_EMAILADDRESS,
                       name_qualifier=f"{idp.url}/saml/metadata", sp_name_qualifier=SP_ID)
    request_id, location = sp.redirect_request(subject=Subject(name_id=qualified))
    assert sp.accept(answer(browser.get(location))[1]["SAMLResponse"], request_id).name_id == "alice@example.com"
    # The right value in another Format, or qualified by another IdP or for another SP, is not
    # the NameID this SP is given.
    for other in (NameID(text="alice@example.com", format=NAMEID_FORMAT_PERSISTENT),
                  NameID(text="alice@example.com", name_qualifier="https://another-idp.example.test/"),
                  NameID(text="alice@example.com", sp_name_qualifier="https://other-sp.example.test/")):
        request_id, location = sp.redirect_request(subject=Subject(name_id=other))
        error_answer(sp, browser.get(location), request_id, StatusUnknownPrincipal, "Responder", "UnknownPrincipal")


def test_a_subject_is_checked_after_a_fresh_sign_in_too(idp, sp):
    browser = idp.client()
    request_id, location = sp.redirect_request(subject=email_subject("bob@example.com"), relay_state="for-bob")
    form = browser.get(location)
    assert urlsplit(form.url).path == "/login"  # no session: the form, the request waits
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
    assert page.headers["X-Refused-Reason"] == "saml.subject_mismatch"
    assert "alice" not in error_answer(sp, page, request_id, StatusUnknownPrincipal, "Responder", "UnknownPrincipal",
                                       relay_state="for-bob")
    # bob himself signing in gets his assertion.
    request_id, location = sp.redirect_request(subject=email_subject("bob@example.com"))
    bobs = idp.client()
    page = idp.sign_in(bobs, "bob", "Bob-pw-1", url=bobs.get(location).url)
    assert sp.accept(answer(page)[1]["SAMLResponse"], request_id).name_id == "bob@example.com"


def redirect_request(idp, body: str) -> str:
    """An unsigned HTTP-Redirect AuthnRequest from SP_ID with *body* after its Issuer."""
    return unsigned_authn_request(idp.url, SP_ID, body)


@pytest.mark.parametrize("subject", [
    '<saml:EncryptedID><xenc:EncryptedData xmlns:xenc="http://www.w3.org/2001/04/xmlenc#"/></saml:EncryptedID>',
    '<saml:BaseID xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="saml:BaseIDAbstractType"/>',
    '<saml:NameID>alice@example.com</saml:NameID><saml:NameID>bob@example.com</saml:NameID>',
    '<saml:NameID>alice@example.com</saml:NameID>'
    '<saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"/>',
])
def test_a_subject_that_is_not_one_name_id_is_refused_not_ignored(idp, sp, subject):
    browser = idp.client()
    signed_in(idp, sp, browser)
    page = browser.get(redirect_request(idp, f"<saml:Subject>{subject}</saml:Subject>"), allow_redirects=False)
    assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "saml.subject_unsupported"
    assert "SAMLResponse" not in page.text


def test_a_name_id_policy_format_other_than_the_sp_s_is_invalid_name_id_policy(idp, sp):
    browser = idp.client()  # no session: answered at once, before any sign-in
    for fmt in (NAMEID_FORMAT_PERSISTENT, "urn:oasis:names:tc:SAML:2.0:nameid-format:encrypted"):
        request_id, location = sp.redirect_request(nameid_format=fmt, relay_state="p")
        page = browser.get(location)
        assert page.headers["X-Refused-Reason"] == "saml.nameid_policy_unsupported"
        error_answer(sp, page, request_id, StatusInvalidNameidPolicy, "Requester", "InvalidNameIDPolicy",
                     relay_state="p")
    # The Format the SP is given, or unspecified: answered.
    request_id, location = sp.redirect_request(nameid_format=NAMEID_FORMAT_EMAILADDRESS)
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(location).url)
    result = sp.accept(answer(page)[1]["SAMLResponse"], request_id)
    assert (result.name_id, result.name_id_format) == ("alice@example.com", NAMEID_FORMAT_EMAILADDRESS)
    request_id, location = sp.redirect_request(nameid_format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
    assert sp.accept(answer(browser.get(location))[1]["SAMLResponse"], request_id).name_id == "alice@example.com"
    # With a session, a policy it cannot meet is still refused.
    request_id, location = sp.redirect_request(nameid_format=NAMEID_FORMAT_PERSISTENT)
    error_answer(sp, browser.get(location), request_id, StatusInvalidNameidPolicy, "Requester", "InvalidNameIDPolicy")


def test_attribute_names_that_are_uris_have_the_uri_name_format(idp, tmp_path):
    uri_sp = SamlSP(tmp_path, idp.metadata, acs=URI_ACS, entity_id=URI_SP)
    browser = idp.client()
    request_id, location = uri_sp.redirect_request()
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(location).url)
    response = answer(page)[1]["SAMLResponse"]
    xml = base64.b64decode(response).decode()
    formats = dict(re.findall(r'<saml:Attribute Name="([^"]+)" NameFormat="([^"]+)"', xml))
    uri, basic = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri", "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
    assert formats == {UPN: uri, MAIL_OID: uri, "uid": basic}
    result = uri_sp.accept(response, request_id)  # pysaml2 maps the urn:oid name by its uri NameFormat
    assert result.attributes["mail"] == ["alice@example.com"] and result.attributes["uid"] == ["alice"]
    assert result.attributes[UPN] == ["alice"]


def test_error_responses_spend_the_clients_budget_as_parked_requests_do(slapd, tmp_path):
    """An error Response is signed at once for a request that needs no credentials (nothing is
    parked): it spends a token of the client's budget too; past it the request is told
    RequestDenied at its ACS, within that answer's own bound, then refused (429): a flood is
    never signed without end (review of the day's changes; review of the login door)."""
    site = LoginSite(tmp_path / "idp", slapd, CA.create(), login={"saml": {"service_providers": [
        {"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress", "name_id_source": "email"}]}})
    site.gw = site.start()
    try:
        flood_sp = SamlSP(tmp_path / "sp", site.client().get(f"{site.url}/saml/metadata").text, acs=ACS,
                          entity_id=SP_ID)
        browser = site.client()
        reasons = []
        for _ in range(90):
            _request_id, location = flood_sp.redirect_request(nameid_format=NAMEID_FORMAT_PERSISTENT)
            page = browser.get(location)
            reasons.append((page.status_code, page.headers.get("X-Refused-Reason"), "SAMLResponse" in page.text))
        signed = [r for r in reasons if r == (200, "saml.nameid_policy_unsupported", True)]
        denied = [r for r in reasons if r == (200, "login.too_many_requests", True)]
        refused = [r for r in reasons if r == (429, "login.too_many_requests", False)]
        assert 30 <= len(signed) < 60 and 30 <= len(denied) < 60 and refused, reasons
        assert len(signed) + len(denied) + len(refused) == 90, reasons
    finally:
        site.stop()
