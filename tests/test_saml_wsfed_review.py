"""Review of the SAML 2.0 IdP and WS-Federation parts of the login front door: each finding
reproduced through a real ``authgw serve`` (slapd behind it; pysaml2 or hand-written messages as
the hostile SP), never a 5xx, never a false accept."""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import textwrap
import zlib

import pytest

from support.login import LoginSite, hidden
from support.pki import CA
from support.saml_sp import rsa_pair
from support.slapd import Slapd

SP, ACS, SLO = "https://sp.example.test/", "https://sp.example.test/acs", "https://sp.example.test/slo"
SIGNED, SIGNED_ACS = "https://signed.example.test/", "https://signed.example.test/acs"
REALM, REPLY = "urn:review:rp", "https://rp.example.test/callback"
SAMLP = 'xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion"'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("saml-wsfed-review")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    signer = rsa_pair(base / "signer", "sp", "signed.example.test")
    login = LoginSite(base / "idp", slapd, CA.create(), login={
        "saml": {"service_providers": [
            {"entity_id": SP, "acs_urls": [ACS], "slo_url": SLO},
            {"entity_id": SIGNED, "acs_urls": [SIGNED_ACS], "request_certificate": str(signer[0])}]},
        "wsfed": {"relying_parties": [{"realm": REALM, "reply_urls": [REPLY]}]}})
    login.gw = login.start()
    login.signer = signer
    yield login
    login.stop()
    slapd.stop()


def instant(seconds: float = 0) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def authn_request(site, *, issuer: str = SP, acs: str = ACS, attributes: str = "", body: str = "") -> bytes:
    return (f'<samlp:AuthnRequest {SAMLP} ID="_{secrets.token_hex(10)}" Version="2.0" IssueInstant="{instant()}" '
            f'AssertionConsumerServiceURL="{acs}" Destination="{site.url}/saml/sso"{attributes}>'
            f'<saml:Issuer>{issuer}</saml:Issuer>{body}</samlp:AuthnRequest>').encode()


def logout_request(site, *, issuer: str = SP, index: str = "nothing", name_id: str = "alice") -> bytes:
    return (f'<samlp:LogoutRequest {SAMLP} ID="_{secrets.token_hex(10)}" Version="2.0" IssueInstant="{instant()}" '
            f'Destination="{site.url}/saml/slo"><saml:Issuer>{issuer}</saml:Issuer><saml:NameID>{name_id}'
            f'</saml:NameID><samlp:SessionIndex>{index}</samlp:SessionIndex></samlp:LogoutRequest>').encode()


def _deflated(xml: bytes) -> str:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return base64.b64encode(packer.compress(xml) + packer.flush()).decode()


def no_5xx_since(site, mark: int) -> None:
    output = site.gw.output()[mark:]
    assert "Traceback" not in output and "a request handler raised" not in output, output[-2000:]


# -- a RelayState that is no Unicode text ----------------------------------------------------------


def test_a_relay_state_decoded_to_a_lone_surrogate_is_refused_not_a_500(site):
    # A form part labelled charset=utf-7 (or a whole urlencoded body so labelled) decodes "+2AA-"
    # to U+D800, a lone surrogate. It was parked with the request; the answer page carrying it
    # could not be encoded: a 500 once the user had signed in (or at once with a session), and at
    # /saml/slo a 500 after the sessions named had been ended.
    mark = len(site.gw.output())
    utf7 = (None, b"+2AA-", "text/plain; charset=utf-7")
    browser = site.client()
    first = browser.post(f"{site.url}/saml/sso", allow_redirects=False, files={
        "SAMLRequest": (None, base64.b64encode(authn_request(site)).decode()), "RelayState": utf7})
    if first.status_code == 303:  # the old code parked it: the answer after the sign-in was the 500
        first = site.sign_in(browser, "alice", "Alice-pw-1", url=site.url + first.headers["Location"])
    assert first.status_code == 400 and first.headers["X-Refused-Reason"] == "login.malformed", first.status_code
    # with a live session, the answer would have been made at once
    signed_in = site.client()
    assert site.sign_in(signed_in, "alice", "Alice-pw-1").status_code == 200
    again = signed_in.post(f"{site.url}/saml/sso", allow_redirects=False, files={
        "SAMLRequest": (None, base64.b64encode(authn_request(site)).decode()), "RelayState": utf7})
    assert again.status_code == 400 and again.headers["X-Refused-Reason"] == "login.malformed", again.status_code
    logout = site.client().post(f"{site.url}/saml/slo", allow_redirects=False, files={
        "SAMLRequest": (None, base64.b64encode(logout_request(site)).decode()), "RelayState": utf7})
    assert logout.status_code == 400 and logout.headers["X-Refused-Reason"] == "login.malformed", logout.status_code
    # the same request with a RelayState that is text is taken
    fine = site.client().post(f"{site.url}/saml/sso", allow_redirects=False, files={
        "SAMLRequest": (None, base64.b64encode(authn_request(site)).decode()),
        "RelayState": (None, "caf\u00e9".encode("utf-7"), "text/plain; charset=utf-7")})
    assert fine.status_code == 303 and fine.headers["Location"].startswith("/login?req=")
    no_5xx_since(site, mark)


# -- a LogoutResponse that did not confirm ---------------------------------------------------------


def test_a_logout_response_cannot_forge_a_log_line(site):
    # The round sends the LogoutRequest through the user's browser: its ID (what a LogoutResponse
    # must answer) is in the page. A LogoutResponse with "&#10;" in its Issuer (or Destination, or
    # status) was logged as it was: a line of the attacker's choosing in the gateway's log.
    mark = len(site.gw.output())
    browser = site.client()
    assert site.sign_in(browser, "alice", "Alice-pw-1").status_code == 200
    answer = browser.get(f"{site.url}/saml/sso", params={"SAMLRequest": _deflated(authn_request(site))})
    assert hidden(answer.text, "SAMLResponse"), answer.text[:300]  # SP is now a participant
    page = browser.get(f"{site.url}/login")
    round_page = browser.post(f"{site.url}/logout", data={"csrf": hidden(page.text, "csrf")},
                              headers={"Origin": site.url}, allow_redirects=False)
    sent = base64.b64decode(hidden(round_page.text, "SAMLRequest")).decode()
    request_id = re.search(r'ID="([^"]+)"', sent).group(1)
    forged = "FORGED-LINE authgw.audit: success user=admin"
    for issuer, destination in ((f"https://evil.example.test/&#10;{forged}", f"{site.url}/saml/slo"),
                                (SP, f"https://x/&#13;&#10;{forged}")):
        response = (f'<samlp:LogoutResponse {SAMLP} ID="_{secrets.token_hex(10)}" Version="2.0" '
                    f'IssueInstant="{instant()}" InResponseTo="{request_id}" Destination="{destination}">'
                    f'<saml:Issuer>{issuer}</saml:Issuer><samlp:Status><samlp:StatusCode '
                    f'Value="urn:oasis:names:tc:SAML:2.0:status:Success"/></samlp:Status></samlp:LogoutResponse>')
        done = browser.post(f"{site.url}/saml/slo", data={"SAMLResponse": base64.b64encode(response.encode())})
        assert done.status_code == 200 and "signed out" in done.text.lower(), done.text[:300]
        # the round is over; the next forged answer goes to a new round
        assert site.sign_in(browser, "alice", "Alice-pw-1").status_code == 200
        browser.get(f"{site.url}/saml/sso", params={"SAMLRequest": _deflated(authn_request(site))})
        page = browser.get(f"{site.url}/login")
        round_page = browser.post(f"{site.url}/logout", data={"csrf": hidden(page.text, "csrf")},
                                  headers={"Origin": site.url}, allow_redirects=False)
        request_id = re.search(r'ID="([^"]+)"', base64.b64decode(hidden(round_page.text, "SAMLRequest")).decode()).group(1)
    lines = site.gw.output()[mark:].splitlines()
    assert not [line for line in lines if line.startswith("FORGED-LINE")], lines[-10:]
    assert sum("did not confirm" in line and "\\nFORGED-LINE" in line for line in lines) == 2, lines[-10:]
    no_5xx_since(site, mark)


# -- ForceAuthn and IsPassive are xs:boolean ---------------------------------------------------------


def test_force_authn_and_is_passive_are_read_as_xml_schema_booleans(site):
    # xs:boolean collapses whitespace: ForceAuthn=" true " asks for a new sign-in. It was read as
    # false, and answered at once from the live session: the SP asked for proof of presence and got
    # an assertion from an old sign-in. A value that is no boolean is refused, not read as false.
    browser = site.client()
    assert site.sign_in(browser, "alice", "Alice-pw-1").status_code == 200
    plain = browser.get(f"{site.url}/saml/sso", params={"SAMLRequest": _deflated(authn_request(site))},
                        allow_redirects=False)
    assert plain.status_code == 200 and hidden(plain.text, "SAMLResponse")  # the session answers
    for value in (" true ", "&#9;1&#10;", "True"):
        forced = browser.get(f"{site.url}/saml/sso", allow_redirects=False, params={
            "SAMLRequest": _deflated(authn_request(site, attributes=f' ForceAuthn="{value}"'))})
        assert forced.status_code == 303 and forced.headers["Location"].startswith("/login?req="), \
            (value, forced.status_code, forced.headers.get("X-Refused-Reason"))
    # IsPassive=" true " without a session: NoPassive, no page
    passive = site.client().get(f"{site.url}/saml/sso", allow_redirects=False, params={
        "SAMLRequest": _deflated(authn_request(site, attributes=' IsPassive=" true "'))})
    assert passive.status_code == 200 and passive.headers.get("X-Refused-Reason") == "saml.no_passive"
    for attribute in (' ForceAuthn="yes"', ' IsPassive="on"'):
        odd = browser.get(f"{site.url}/saml/sso", allow_redirects=False,
                          params={"SAMLRequest": _deflated(authn_request(site, attributes=attribute))})
        assert odd.status_code == 400 and odd.headers["X-Refused-Reason"] == "login.malformed", attribute
    still = browser.get(f"{site.url}/saml/sso", allow_redirects=False, params={
        "SAMLRequest": _deflated(authn_request(site, attributes=' ForceAuthn=" false " IsPassive="0"'))})
    assert still.status_code == 200 and hidden(still.text, "SAMLResponse")


def test_a_service_provider_sent_unsigned_assertions_is_a_configuration_error(tmp_path):
    """`sign_response: false` and `sign_assertion: false` together sent assertions with no
    signature at all, which anyone can write: refused, naming the file, line and key."""
    from support.gateway import authgw, write_conf

    users = tmp_path / "users.yaml"
    users.write_text("users: {}\n")
    users.chmod(0o600)
    conf = write_conf(tmp_path / "conf", {"gateway.yaml": textwrap.dedent(f"""\
        chain: [static]
        plugins: [login]
        static:
          users_file: {users}
        login:
          base_url: https://login.example.com
          saml:
            service_providers:
              - entity_id: https://sp.example.com
                acs_urls: [https://sp.example.com/acs]
                sign_response: false
                sign_assertion: false
        """)})
    result = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r"gateway\.yaml:\d+: login\.saml\.service_providers\[0\]: .*unsigned assertions", output), output
