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


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    base = tmp_path_factory.mktemp("wsfed")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    site = LoginSite(base / "idp", slapd, CA.create(), login={"wsfed": {"relying_parties": [
        {"realm": REALM, "reply_urls": [REPLY], "name_id_source": "email", "name_id_format": "emailAddress",
         "attributes": {"http://schemas.xmlsoap.org/claims/Group": "groups"}}]}})
    site.gw = site.start()
    yield site
    site.stop()
    slapd.stop()


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
        return subprocess.run(["xmlsec1", "--verify", "--pubkey-cert-pem", str(tmp_path / "idp.pem"),
                               "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion", str(path)],
                              capture_output=True, text=True)

    result = verify(tmp_path / "wresult.xml")
    assert result.returncode == 0 and "OK" in result.stderr, result.stderr
    # The check can fail: the same token with its NameID changed does not verify.
    (tmp_path / "forged.xml").write_text(answer["wresult"].replace("alice@example.com", "mallory@example.com"))
    assert verify(tmp_path / "forged.xml").returncode != 0


@pytest.mark.parametrize("params, reason", [
    ({"wa": "wsignout1.0", "wtrealm": REALM}, "wsfed.unsupported_action"),
    ({"wa": "wsignin1.0", "wtrealm": "urn:unknown"}, "wsfed.unknown_realm"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wreply": "https://evil.example.test/callback"}, "wsfed.reply_not_registered"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wreply": REPLY + "/../../evil"}, "wsfed.reply_not_registered"),
    ({"wa": "wsignin1.0", "wtrealm": REALM, "wctx": "x" * 5000}, "login.parameter_too_large"),
])
def test_unregistered_realms_and_replies_are_refused(idp, params, reason):
    response = idp.client().get(f"{idp.url}/wsfed", params=params, allow_redirects=False)
    assert response.status_code == 400 and response.headers["X-Refused-Reason"] == reason
    assert "evil" not in response.text


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
