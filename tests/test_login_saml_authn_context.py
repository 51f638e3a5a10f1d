"""``<samlp:RequestedAuthnContext>`` (SAML core 3.3.2.2.1): an AuthnRequest that asks for an
authentication context the sign-in does not meet gets ``Responder`` / ``NoAuthnContext`` and no
assertion, never a Success from a password session when it asked for a certificate or Kerberos.
The SP is pysaml2 (tests/support/saml_sp.py: it verifies the Responses' signatures with
``xmlsec1`` and raises the status as an exception); the IdP a real ``authgw serve`` with the
``client_cert`` (on its own TLS listener) and ``ldap`` chain steps and slapd. Hostile XML (two
RequestedAuthnContext, an unknown Comparison, mixed references) is refused as malformed."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest
from saml2.response import StatusNoAuthnContext
from saml2.saml import AuthnContextClassRef
from saml2.samlp import RequestedAuthnContext

from support.login import LoginSite, certificate_listener, hidden, unsigned_authn_request
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

ACS = "https://sp.example.test/acs"
SP_ID = "https://sp.example.test/"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
AC = "urn:oasis:names:tc:SAML:2.0:ac:classes:"
PASSWORD, KERBEROS, X509 = AC + "PasswordProtectedTransport", AC + "Kerberos", AC + "X509"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    base = tmp_path_factory.mktemp("authn-context")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    ca = CA.create()
    certificate_files, cert_url = certificate_listener(base, ca)
    site = LoginSite(base / "idp", slapd, ca, gateway={"chain": ["client_cert", "ldap"]},
                     login={"saml": {"service_providers": [
                         {"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "emailAddress",
                          "name_id_source": "email"}]}},
                     extra=certificate_files)
    site.gw = site.start()
    site.cert_url = cert_url
    site.alice_cert = tuple(str(p) for p in ca.issue("alice", client=True).write(base, "alice"))
    site.metadata = site.client().get(f"{site.url}/saml/metadata").text
    yield site
    site.stop()
    slapd.stop()


@pytest.fixture(scope="module")
def sp(idp, tmp_path_factory):
    return SamlSP(tmp_path_factory.mktemp("sp"), idp.metadata, acs=ACS, entity_id=SP_ID)


def context(comparison: str | None, *refs: str) -> RequestedAuthnContext:
    extra = {"comparison": comparison} if comparison else {}
    return RequestedAuthnContext(authn_context_class_ref=[AuthnContextClassRef(text=r) for r in refs], **extra)


def fields_of(page) -> dict[str, str]:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    assert action == ACS
    return {n: hidden(page.text, n) for n in ("SAMLResponse", "RelayState") if hidden(page.text, n)}


def success(sp, page, request_id: str) -> str:
    """The Success Response *page* posts: pysaml2 accepts it; returns its AuthnContextClassRef."""
    response = fields_of(page)["SAMLResponse"]
    assert sp.accept(response, request_id).name_id == "alice@example.com"
    return re.search(r"<saml:AuthnContextClassRef>([^<]+)<", base64.b64decode(response).decode()).group(1)


def no_authn_context(sp, page, request_id: str) -> None:
    """An error Response, Responder / NoAuthnContext, no assertion; pysaml2 verified its
    signature before it raised the status."""
    assert page.headers.get("X-Refused-Reason") == "saml.authn_context_unmet"
    response = fields_of(page)["SAMLResponse"]
    with pytest.raises(StatusNoAuthnContext):
        sp.accept(response, request_id)
    xml = base64.b64decode(response).decode()
    assert re.search(rf'<samlp:StatusCode Value="{STATUS}Responder">\s*'
                     rf'<samlp:StatusCode Value="{STATUS}NoAuthnContext"/>', xml)
    assert "Assertion" not in xml and f'InResponseTo="{request_id}"' in xml and "<ds:Signature" in xml


def password_session(idp, sp):
    browser = idp.client()
    request_id, location = sp.redirect_request()
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(location).url)
    assert success(sp, page, request_id) == PASSWORD
    return browser


def test_a_password_session_asked_for_a_certificate_or_kerberos_gets_no_authn_context(idp, sp):
    browser = password_session(idp, sp)
    for requested in (context("exact", X509), context(None, KERBEROS), context("exact", X509, KERBEROS),
                      context("better", PASSWORD), context("minimum", X509)):
        request_id, location = sp.redirect_request(requested_authn_context=requested)
        page = browser.get(location)
        assert 'id="password"' not in page.text  # from the session: no sign-in page either
        no_authn_context(sp, page, request_id)
    assert "reason=saml.authn_context_unmet" in idp.gw.output()
    # what the password sign-in meets is answered from the same session
    for requested in (context("exact", PASSWORD), context(None, X509, PASSWORD), context("minimum", PASSWORD),
                      context("minimum", AC + "Password"), context("maximum", PASSWORD), context("maximum", X509)):
        request_id, location = sp.redirect_request(requested_authn_context=requested)
        assert success(sp, browser.get(location), request_id) == PASSWORD, requested


def test_a_fresh_password_sign_in_is_checked_too(idp, sp):
    browser = idp.client()
    request_id, location = sp.redirect_request(requested_authn_context=context("exact", X509), relay_state="r")
    form = browser.get(location)
    assert urlsplit(form.url).path == "/login"  # a certificate could meet it: the request waits for a sign-in
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
    no_authn_context(sp, page, request_id)
    assert fields_of(page)["RelayState"] == "r"


def test_a_client_certificate_sign_in_meets_x509_and_better_than_password(idp, sp):
    browser = idp.client()
    browser.cert = idp.alice_cert
    request_id, location = sp.redirect_request(requested_authn_context=context("exact", X509))
    page = browser.get(location.replace(idp.url, idp.cert_url, 1))  # the certificate signs in at /login
    assert success(sp, page, request_id) == X509
    for requested in (context("better", PASSWORD), context("minimum", PASSWORD), context("exact", KERBEROS, X509)):
        request_id, location = sp.redirect_request(requested_authn_context=requested)
        assert success(sp, browser.get(location.replace(idp.url, idp.cert_url, 1)), request_id) == X509
    for requested in (context("exact", PASSWORD), context("minimum", KERBEROS), context("maximum", PASSWORD)):
        request_id, location = sp.redirect_request(requested_authn_context=requested)
        no_authn_context(sp, browser.get(location.replace(idp.url, idp.cert_url, 1)), request_id)


def test_a_context_no_sign_in_method_has_is_answered_at_once(idp, sp):
    browser = idp.client()  # no session: answered before any form
    for requested in (context("exact", AC + "MobileTwoFactorContract"), context(None, AC + "Password"),
                      context("minimum", AC + "SmartcardPKI"), context("better", X509)):
        request_id, location = sp.redirect_request(requested_authn_context=requested)
        page = browser.get(location)
        assert urlsplit(page.url).path == "/saml/sso" and 'id="password"' not in page.text
        no_authn_context(sp, page, request_id)
    declaration = ('<samlp:RequestedAuthnContext><saml:AuthnContextDeclRef>urn:example:decl'
                   '</saml:AuthnContextDeclRef></samlp:RequestedAuthnContext>')
    page = browser.get(raw_request(idp, declaration))
    assert page.headers.get("X-Refused-Reason") == "saml.authn_context_unmet"
    assert f"{STATUS}NoAuthnContext" in base64.b64decode(fields_of(page)["SAMLResponse"]).decode()


def raw_request(idp, body: str) -> str:
    """An unsigned HTTP-Redirect AuthnRequest from SP_ID with *body* after its Issuer."""
    return unsigned_authn_request(idp.url, SP_ID, body)


CLASS = f"<saml:AuthnContextClassRef>{PASSWORD}</saml:AuthnContextClassRef>"


@pytest.mark.parametrize("body", [
    f'<samlp:RequestedAuthnContext Comparison="atleast">{CLASS}</samlp:RequestedAuthnContext>',
    f'<samlp:RequestedAuthnContext Comparison="">{CLASS}</samlp:RequestedAuthnContext>',
    f"<samlp:RequestedAuthnContext>{CLASS}</samlp:RequestedAuthnContext>" * 2,
    "<samlp:RequestedAuthnContext></samlp:RequestedAuthnContext>",
    "<samlp:RequestedAuthnContext><saml:AuthnContextClassRef> </saml:AuthnContextClassRef>"
    "</samlp:RequestedAuthnContext>",
    f"<samlp:RequestedAuthnContext>{CLASS}<saml:AuthnContextDeclRef>urn:x</saml:AuthnContextDeclRef>"
    "</samlp:RequestedAuthnContext>",
    f"<samlp:RequestedAuthnContext>{CLASS}<saml:AuthnContextDecl/></samlp:RequestedAuthnContext>",
    f"<samlp:RequestedAuthnContext><saml:AuthnContextClassRef>{PASSWORD}<x/></saml:AuthnContextClassRef>"
    "</samlp:RequestedAuthnContext>",
    f"<samlp:RequestedAuthnContext>{CLASS * 17}</samlp:RequestedAuthnContext>",
    f"<samlp:RequestedAuthnContext><saml:AuthnContextClassRef>{'u' * 1025}</saml:AuthnContextClassRef>"
    "</samlp:RequestedAuthnContext>",
])
def test_a_malformed_requested_authn_context_is_refused(idp, sp, body):
    browser = password_session(idp, sp)
    page = browser.get(raw_request(idp, body), allow_redirects=False)
    assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "login.malformed"
    assert "SAMLResponse" not in page.text


def test_a_well_formed_request_with_comments_and_sixteen_references_is_read(idp, sp):
    browser = password_session(idp, sp)
    refs = "".join(f"<saml:AuthnContextClassRef>urn:example:{n}</saml:AuthnContextClassRef>" for n in range(15))
    page = browser.get(raw_request(idp, f'<samlp:RequestedAuthnContext Comparison="exact"><!-- x -->{refs}{CLASS}'
                                        "</samlp:RequestedAuthnContext>"))
    assert "SAMLResponse" in page.text and page.headers.get("X-Refused-Reason") is None
