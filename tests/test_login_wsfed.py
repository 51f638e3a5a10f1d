"""WS-Federation passive sign-in: the RSTR's SAML assertion verified by ``xmlsec1 --verify``
(Debian xmlsec1, independent of signxml) with the certificate from the metadata; only registered
realms and replies."""

from __future__ import annotations

import re
import subprocess

import pytest
from lxml import etree

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd

REALM, REPLY = "urn:auth0:example:adfs-connection", "https://example.auth0.test/login/callback"
ENTRA, ENTRA_REPLY = "urn:federation:MicrosoftOnline", "https://login.microsoftonline.test/login.srf"
SIGNED_OUT = "https://example.auth0.test/logged-out"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    base = tmp_path_factory.mktemp("wsfed")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    site = LoginSite(base / "idp", slapd, CA.create(), login={"wsfed": {"relying_parties": [
        {"realm": REALM, "reply_urls": [REPLY], "signout_urls": [SIGNED_OUT], "name_id_source": "email",
         "name_id_format": "emailAddress",
         "attributes": {"http://schemas.xmlsoap.org/claims/Group": "groups"}},
        {"realm": ENTRA, "reply_urls": [ENTRA_REPLY], "token": "saml11", "name_id_format": "persistent",
         "name_id_source": "subject", "attributes": {
             "http://schemas.xmlsoap.org/claims/UPN": "email",
             "http://schemas.microsoft.com/LiveID/Federation/2008/05/ImmutableID": "subject"}}]}})
    site.gw = site.start()
    yield site
    site.stop()
    slapd.stop()


def xmlsec1_verify(cert, path, id_attr: str, node: str):
    return subprocess.run(["xmlsec1", "--verify", "--pubkey-cert-pem", str(cert), f"--id-attr:{id_attr}", node,
                           str(path)], capture_output=True, text=True)


def current_cert(idp, tmp_path):
    metadata = idp.client().get(f"{idp.url}/saml/metadata").text
    cert = re.search(r"<ds:X509Certificate>([^<]+)<", metadata).group(1)
    (tmp_path / "idp.pem").write_text(f"-----BEGIN CERTIFICATE-----\n{cert}\n-----END CERTIFICATE-----\n")
    return tmp_path / "idp.pem"


def fields(page) -> tuple[str, dict[str, str]]:
    import html
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    found = {m.group(1): html.unescape(m.group(2))
             for m in re.finditer(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text)}
    return action, found


def test_wsignin_answers_an_rstr_whose_assertion_xmlsec1_verifies(idp, tmp_path):
    browser = idp.client()
    form = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM, "wreply": REPLY,
                                                   "wctx": "rm=0&id=passive&ru=%2f"})
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
    action, answer = fields(page)
    assert action == REPLY and answer["wa"] == "wsignin1.0" and answer["wctx"] == "rm=0&id=passive&ru=%2f"
    rstr = etree.fromstring(answer["wresult"].encode())
    ns = {"t": "http://schemas.xmlsoap.org/ws/2005/02/trust", "s": "urn:oasis:names:tc:SAML:2.0:assertion"}
    assert rstr.findtext(".//s:Audience", namespaces=ns) == REALM
    assert rstr.findtext(".//s:NameID", namespaces=ns) == "alice@example.com"
    assert rstr.findtext(".//s:AttributeValue", namespaces=ns) == "staff"
    metadata = idp.client().get(f"{idp.url}/saml/metadata").text
    cert = re.search(r"<ds:X509Certificate>([^<]+)<", metadata).group(1)
    (tmp_path / "idp.pem").write_text(f"-----BEGIN CERTIFICATE-----\n{cert}\n-----END CERTIFICATE-----\n")
    (tmp_path / "wresult.xml").write_text(answer["wresult"])

    def verify(path):
        return xmlsec1_verify(tmp_path / "idp.pem", path, "ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion")

    result = verify(tmp_path / "wresult.xml")
    assert result.returncode == 0 and "OK" in result.stderr, result.stderr
    # The check can fail: the same token with its NameID changed does not verify.
    (tmp_path / "forged.xml").write_text(answer["wresult"].replace("alice@example.com", "mallory@example.com"))
    assert verify(tmp_path / "forged.xml").returncode != 0


@pytest.mark.parametrize("params, reason", [
    ({"wa": "wattr1.0", "wtrealm": REALM}, "wsfed.unsupported_action"),
    ({"wa": "wsignout1.0", "wtrealm": REALM, "wreply": "https://evil.example.test/"}, "wsfed.reply_not_registered"),
    ({"wa": "wsignout1.0", "wtrealm": "urn:unknown", "wreply": REPLY}, "wsfed.unknown_realm"),
    ({"wa": "wsignin1.0", "wtrealm": "urn:unknown"}, "wsfed.unknown_realm"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wreply": "https://evil.example.test/callback"}, "wsfed.reply_not_registered"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wreply": REPLY + "/../../evil"}, "wsfed.reply_not_registered"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wctx": "x" * 5000}, "login.parameter_too_large"),
])
def test_unregistered_realms_and_replies_are_refused(idp, params, reason):
    response = idp.client().get(f"{idp.url}/wsfed", params=params, allow_redirects=False)
    assert response.status_code == 400 and response.headers["X-Refused-Reason"] == reason
    assert "evil" not in response.text


def test_wfresh_and_prompt_login_ask_for_a_new_sign_in_over_a_live_session(idp):
    """WS-Federation 1.2 section 13.2.1: ``wfresh=0`` re-prompts the user before a token is
    issued (what Entra ID sends for an application's ``prompt=login``); it used to be ignored,
    and the old session answered."""
    browser = idp.client()
    first = idp.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(
        f"{idp.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM}).url)
    instant = re.compile(r'AuthnInstant="([^"]+)"')
    signed_in_at = instant.search(fields(first)[1]["wresult"]).group(1)

    def ask(**extra):
        return browser.get(f"{idp.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM, **extra})

    for fresh in ({"wfresh": "0"}, {"wfresh": "0", "wauth": "urn:oasis:names:tc:SAML:1.0:am:password"},
                  {"prompt": "login"}):
        page = ask(**fresh)
        assert 'id="password"' in page.text and "wresult" not in page.text, fresh
    assert "wresult" in ask(wfresh="60").text  # a sign-in within the hour: the session answers
    assert "wresult" in ask().text
    again = idp.sign_in(browser, "alice", "Alice-pw-1", url=ask(wfresh="0").url)
    assert instant.search(fields(again)[1]["wresult"]).group(1) >= signed_in_at
    for bad in ("-1", "1.5", "x", "²", "9" * 10):
        refused = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM, "wfresh": bad},
                              allow_redirects=False)
        assert refused.status_code == 400 and refused.headers["X-Refused-Reason"] == "login.malformed", bad


def test_federation_metadata_lists_both_certificates_and_the_passive_endpoint(idp):
    text = idp.client().get(f"{idp.url}/FederationMetadata/2007-06/FederationMetadata.xml").text
    root = etree.fromstring(text.encode())
    ns = {"md": "urn:oasis:names:tc:SAML:2.0:metadata", "ds": "http://www.w3.org/2000/09/xmldsig#",
          "fed": "http://docs.oasis-open.org/wsfed/federation/200706", "wsa": "http://www.w3.org/2005/08/addressing"}
    role = root.find("md:RoleDescriptor", ns)
    assert role.get("{http://www.w3.org/2001/XMLSchema-instance}type") == "fed:SecurityTokenServiceType"
    assert role.findtext("fed:PassiveRequestorEndpoint/wsa:EndpointReference/wsa:Address", namespaces=ns) \
        == f"{idp.url}/wsfed"
    saml = idp.client().get(f"{idp.url}/saml/metadata").text
    assert [c.text for c in role.iterfind(".//ds:X509Certificate", ns)] == \
        re.findall(r"<ds:X509Certificate>([^<]+)<", saml)


def test_a_saml_1_1_token_for_entra_style_realms_verifies_with_xmlsec1(idp, tmp_path):
    browser = idp.client()
    form = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": ENTRA})
    action, answer = fields(idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url))
    assert action == ENTRA_REPLY
    rstr = etree.fromstring(answer["wresult"].encode())
    ns = {"t": "http://schemas.xmlsoap.org/ws/2005/02/trust", "s": "urn:oasis:names:tc:SAML:1.0:assertion"}
    assert rstr.findtext("t:TokenType", namespaces=ns).endswith("#SAMLV1.1")
    assertion = rstr.find(".//s:Assertion", ns)
    assert assertion.get("MajorVersion") == "1" and assertion.get("MinorVersion") == "1"
    assert rstr.findtext(".//s:Audience", namespaces=ns) == ENTRA
    values = {a.get("AttributeName"): a.findtext("s:AttributeValue", namespaces=ns)
              for a in rstr.iterfind(".//s:Attribute", ns)}
    assert values["UPN"] == "alice@example.com" and values["ImmutableID"]
    assert rstr.findtext(".//s:NameIdentifier", namespaces=ns) == values["ImmutableID"]
    (tmp_path / "token.xml").write_text(answer["wresult"])
    cert = current_cert(idp, tmp_path)
    node = "urn:oasis:names:tc:SAML:1.0:assertion:Assertion"
    result = xmlsec1_verify(cert, tmp_path / "token.xml", "AssertionID", node)
    assert result.returncode == 0 and "OK" in result.stderr, result.stderr
    (tmp_path / "forged.xml").write_text(answer["wresult"].replace("alice@example.com", "mallory@example.com"))
    assert xmlsec1_verify(cert, tmp_path / "forged.xml", "AssertionID", node).returncode != 0


def test_wsignout_ends_the_session_and_goes_only_to_a_registered_reply(idp):
    browser = idp.client()
    idp.sign_in(browser, "alice", "Alice-pw-1")
    assert "signed in as" in browser.get(f"{idp.url}/login").text
    # an unregistered wreply: refused, nothing happens (the session stays)
    refused = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignout1.0", "wreply": "https://evil.example.test/"},
                          allow_redirects=False)
    assert refused.status_code == 400 and refused.headers["X-Refused-Reason"] == "wsfed.reply_not_registered"
    assert "signed in as" in browser.get(f"{idp.url}/login").text
    out = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignout1.0", "wtrealm": REALM, "wreply": SIGNED_OUT},
                      allow_redirects=False)
    assert out.status_code == 303 and out.headers["Location"] == SIGNED_OUT
    assert 'id="password"' in browser.get(f"{idp.url}/login").text
    # without wreply: the signed-out page; a sign-in reply URL is a valid sign-out reply too
    idp.sign_in(browser, "alice", "Alice-pw-1")
    page = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignout1.0"})
    assert page.status_code == 200 and "You are signed out." in page.text
    idp.sign_in(browser, "alice", "Alice-pw-1")
    out = browser.get(f"{idp.url}/wsfed", params={"wa": "wsignoutcleanup1.0", "wreply": REPLY}, allow_redirects=False)
    assert out.status_code == 303 and out.headers["Location"] == REPLY
    assert 'id="password"' in browser.get(f"{idp.url}/login").text
