"""The SAML 2.0 IdP end to end with an independent SP (pysaml2, which checks the signatures with
xmlsec1 and the audience, recipient, destination, InResponseTo and time window itself), the
browser played by a cookie-keeping HTTP client through a real ``authgw serve`` and slapd."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest

from support.gateway import authgw
from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

ACS = "https://sp.example.test/acs"
SP_ID = "https://sp.example.test/"
SLO = "https://sp.example.test/slo"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff", "admins"])
    yield server
    server.stop()


def sp_settings(**kw) -> dict:
    sp = {"entity_id": SP_ID, "acs_urls": [ACS, "https://sp.example.test/acs2"], "name_id_format": "emailAddress",
          "name_id_source": "email", "attributes": {"uid": "username", "mail": "email", "groups": "groups",
                                                     "displayName": "display_name"}}
    sp.update(kw)
    return sp


@pytest.fixture(scope="module")
def idp(tmp_path_factory, slapd):
    directory = tmp_path_factory.mktemp("idp")
    site = LoginSite(directory, slapd, CA.create(), login={"saml": {"service_providers": [
        sp_settings(slo_url=SLO), sp_settings(entity_id="https://other.example.test/", acs_urls=["https://other.example.test/acs"],
                                   name_id_format="persistent", name_id_source="username", attributes={},
                                   sign_response=False, idp_initiated=True,
                                   idp_initiated_relay_states=["/home"])]}})
    site.gw = site.start()
    site.metadata = site.client().get(f"{site.url}/saml/metadata").text
    yield site
    site.stop()


@pytest.fixture(scope="module")
def sp(idp, tmp_path_factory):
    return SamlSP(tmp_path_factory.mktemp("sp"), idp.metadata, acs=ACS, entity_id=SP_ID, slo=SLO)


def answer(page) -> tuple[str, dict[str, str]]:
    """The auto-post form's target and fields."""
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    return action, {name: hidden(page.text, name) for name in ("SAMLResponse", "RelayState") if hidden(page.text, name)}


def test_metadata_has_the_current_and_the_next_signing_certificate(idp):
    certs = re.findall(r"<ds:X509Certificate>([^<]+)</ds:X509Certificate>", idp.metadata)
    assert len(certs) == 2 and certs[0] != certs[1]
    assert f'entityID="{idp.url}/saml/metadata"' in idp.metadata
    assert f'Location="{idp.url}/saml/sso"' in idp.metadata
    keys = sorted(p.name for p in (idp.gw.state_dir / "login").glob("signing-*"))
    assert keys == ["signing-current.crt", "signing-current.key", "signing-next.crt", "signing-next.key"]
    assert all((idp.gw.state_dir / "login" / k).stat().st_mode & 0o077 == 0 for k in keys)
    cli = authgw("saml", "metadata", "--config", str(idp.conf), "--state-dir", str(idp.gw.state_dir))
    assert cli.returncode == 0 and cli.stdout.strip() == idp.metadata.strip()


def test_sp_initiated_login_by_redirect_binding_is_accepted_by_pysaml2(idp, sp):
    browser = idp.client()
    request_id, location = sp.redirect_request(relay_state="/after?x=1")
    assert location.startswith(f"{idp.url}/saml/sso?SAMLRequest=")
    form = browser.get(location)
    assert urlsplit(form.url).path == "/login" and hidden(form.text, "req")  # no session yet: the form
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
    action, fields = answer(page)
    assert action == ACS and fields["RelayState"] == "/after?x=1"
    assert "form-action https://sp.example.test" in page.headers["Content-Security-Policy"]
    result = sp.accept(fields["SAMLResponse"], request_id)
    assert (result.name_id, result.issuer) == ("alice@example.com", f"{idp.url}/saml/metadata")
    assert result.attributes["uid"] == ["alice"] and sorted(result.attributes["groups"]) == ["admins", "staff"]
    assert result.attributes["displayName"] == ["Alice Liddell"]
    # A second SP login rides on the session: no form, a fresh answer to the new request.
    second_id, location = sp.redirect_request()
    again = browser.get(location)
    assert urlsplit(again.url).path == "/saml/sso"
    second = sp.accept(answer(again)[1]["SAMLResponse"], second_id)
    assert second.session_index == result.session_index and second.name_id == "alice@example.com"
    audit = [(a["front_door"], a["outcome"]) for a in idp.gw.audit()]
    assert audit[-1] == ("login", "success")


def test_post_binding_and_a_replayed_response_is_refused_by_the_sp(idp, sp):
    browser = idp.client()
    request_id, fields = sp.post_request(relay_state="rs")
    form = browser.post(f"{idp.url}/saml/sso", data=fields)
    assert urlsplit(form.url).path == "/login"
    response = answer(idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url))[1]["SAMLResponse"]
    assert sp.accept(response, request_id).name_id == "alice@example.com"
    with pytest.raises(Exception):  # the SP's own InResponseTo check: not for another request
        sp.accept(response, "_some-other-request")


def test_idp_initiated_only_where_allowed_and_unsigned_response_with_signed_assertion(idp, tmp_path):
    browser = idp.client()
    idp.sign_in(browser, "alice", "Alice-pw-1")
    refused = browser.get(f"{idp.url}/saml/idp", params={"sp": SP_ID})
    assert refused.status_code == 400 and refused.headers["X-Refused-Reason"] == "saml.idp_initiated_refused"
    page = browser.get(f"{idp.url}/saml/idp", params={"sp": "https://other.example.test/"})
    action, fields = answer(page)
    assert action == "https://other.example.test/acs"
    other = SamlSP(tmp_path / "other", idp.metadata, acs=action, entity_id="https://other.example.test/",
                   want_response_signed=False, allow_unsolicited=True)
    assert "<ds:Signature" in base64.b64decode(fields["SAMLResponse"]).split(b"<saml:Assertion")[1].decode()
    result = other.accept(fields["SAMLResponse"], None)
    assert result.name_id == "alice" and result.name_id_format.endswith(":persistent")


def test_an_idp_initiated_login_carries_only_a_relay_state_its_sp_lists(idp):
    """Anyone can write `/saml/idp?sp=...&RelayState=https://evil.example/`, and SPs read the
    RelayState as where to go after the login: the user was signed in at the SP, unsolicited,
    and sent on to the attacker's page (left from an earlier review). Only the SP's
    `idp_initiated_relay_states` pass, exactly; another is refused before any page."""
    browser = idp.client()
    idp.sign_in(browser, "alice", "Alice-pw-1")
    for value in ("https://evil.example/", "/home/../../evil", "/HOME"):
        page = browser.get(f"{idp.url}/saml/idp", params={"sp": "https://other.example.test/", "RelayState": value})
        assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "saml.relay_state_not_allowed", value
        assert "SAMLResponse" not in page.text
    action, fields = answer(browser.get(f"{idp.url}/saml/idp",
                                        params={"sp": "https://other.example.test/", "RelayState": "/home"}))
    assert action == "https://other.example.test/acs" and fields["RelayState"] == "/home"
    assert "reason=saml.relay_state_not_allowed" in idp.gw.output()


def test_rotation_moves_next_to_current_and_the_sp_still_trusts_it(idp, sp, slapd, tmp_path):
    import shutil
    state = tmp_path / "state"
    shutil.copytree(idp.gw.state_dir / "login", state / "login", ignore=shutil.ignore_patterns("sessions.sqlite3*"))
    before = re.findall(r"<ds:X509Certificate>([^<]+)<", idp.metadata)
    result = authgw("saml", "rotate", "--config", str(idp.conf), "--state-dir", str(state))
    assert result.returncode == 0, result.stdout + result.stderr
    after = re.findall(r"<ds:X509Certificate>([^<]+)<",
                       authgw("saml", "metadata", "--config", str(idp.conf), "--state-dir", str(state)).stdout)
    assert after[0] == before[1] and after[1] not in before
    # The same IdP, restarted on the rotated keys: an SP that read the metadata before the
    # rotation (sp, with the old current + next) accepts what the new current key signs.
    rotated = LoginSite(tmp_path / "rotated", slapd, CA.create(), login={
        "base_url": idp.url, "saml": {"service_providers": [sp_settings()]}})  # same names, another port
    rotated.start(state=state)
    try:
        browser = rotated.client()
        request_id, location = sp.redirect_request()
        location = location.replace(idp.url, rotated.url)
        form = browser.get(location)
        page = rotated.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
        xml = re.sub(r"\s", "", base64.b64decode(answer(page)[1]["SAMLResponse"]).decode())  # KeyInfo wraps lines
        assert after[0] in xml and before[0] not in xml  # signed by the former next key
        assert sp.accept(answer(page)[1]["SAMLResponse"], request_id).name_id == "alice@example.com"
    finally:
        rotated.stop()


def test_force_authn_asks_again_despite_the_session(idp, sp):
    browser = idp.client()
    idp.sign_in(browser, "alice", "Alice-pw-1")
    request_id, location = sp.redirect_request(force_authn="true")
    form = browser.get(location)
    assert hidden(form.text, "req") and 'id="password"' in form.text
    page = idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url)
    assert sp.accept(answer(page)[1]["SAMLResponse"], request_id).name_id == "alice@example.com"


def signed_in(idp, sp, browser):
    request_id, location = sp.redirect_request()
    form = browser.get(location)
    return sp.accept(answer(idp.sign_in(browser, "alice", "Alice-pw-1", url=form.url))[1]["SAMLResponse"], request_id)


def test_single_logout_by_redirect_ends_the_session_and_pysaml2_accepts_the_answer(idp, sp):
    browser = idp.client()
    result = signed_in(idp, sp, browser)
    assert "signed in as" in browser.get(f"{idp.url}/login").text
    request_id, info = sp.logout_request(f"{idp.url}/saml/slo", result, relay_state="bye")
    page = browser.get(dict(info["headers"])["Location"])
    action, fields = answer(page)
    assert action == SLO and fields["RelayState"] == "bye"
    response = sp.accept_logout(fields["SAMLResponse"])
    assert response.in_response_to == request_id
    assert response.status.status_code.value == "urn:oasis:names:tc:SAML:2.0:status:Success"
    assert "signed in as" not in browser.get(f"{idp.url}/login").text


def test_single_logout_by_post_without_the_cookie_ends_the_session_by_its_index(idp, sp):
    from saml2 import BINDING_HTTP_POST
    browser = idp.client()
    result = signed_in(idp, sp, browser)
    _, info = sp.logout_request(f"{idp.url}/saml/slo", result, binding=BINDING_HTTP_POST)
    fields = {k: v for k, v in re.findall(r'name="([^"]+)" value="([^"]*)"', info["data"])}
    page = idp.client().post(f"{idp.url}/saml/slo", data=fields)  # a cross-site POST: no cookie
    assert answer(page)[0] == SLO
    assert "signed in as" not in browser.get(f"{idp.url}/login").text


def test_single_logout_needs_a_registered_slo_url(idp, tmp_path):
    other = SamlSP(tmp_path, idp.metadata, acs="https://other.example.test/acs", entity_id="https://other.example.test/")
    fake = other.client.create_logout_request(f"{idp.url}/saml/slo", other.idp, session_indexes=["_x"],
                                              name_id=__import__("saml2.saml", fromlist=["NameID"]).NameID(text="alice"))[1]
    import zlib
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    encoded = base64.b64encode(packer.compress(str(fake).encode()) + packer.flush()).decode()
    page = idp.client().get(f"{idp.url}/saml/slo", params={"SAMLRequest": encoded})
    assert page.status_code == 400 and page.headers["X-Refused-Reason"] == "saml.slo_not_registered"
