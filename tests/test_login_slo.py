"""SAML Single Logout propagated by authgw (SAML profiles section 4.4) with two independent SPs
(pysaml2: they check every signature with xmlsec1 against the IdP metadata, the NameID as issued,
InResponseTo and status themselves), the browser played by a cookie-keeping HTTP client (the
round is plain auto-posting forms: a browser adds nothing the client does not do) through a
real ``authgw serve`` and slapd."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest

from support.login import LoginSite, hidden
from support.pki import CA
from support.redis import RedisServer
from support.saml_sp import SamlSP, rsa_pair
from support.slapd import Slapd

ONE, TWO, THREE, FOUR = (f"https://{n}.example.test/" for n in ("one", "two", "three", "four"))
ACS = {sp: sp + "acs" for sp in (ONE, TWO, THREE, FOUR)}
SLO = {sp: sp + "slo" for sp in (ONE, TWO, THREE, FOUR)}
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
WSFED_REPLY = "https://rp.example.test/signed-out"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com")
    server.add_user("bob", "Bob-pw-1", mail="bob@example.com")
    yield server
    server.stop()


def build_site(directory, slapd, **login) -> LoginSite:
    keys = {sp: rsa_pair(directory / "sp", f"sp{n}", urlsplit(sp).hostname)
            for n, sp in enumerate((ONE, TWO, THREE, FOUR))}
    providers = [
        # one: signs its logout messages (required); persistent NameID
        {"entity_id": ONE, "acs_urls": [ACS[ONE]], "slo_url": SLO[ONE], "name_id_format": "persistent",
         "request_certificate": str(keys[ONE][0])},
        # two: a transient NameID (a new one per answer: logout must name the last one issued)
        {"entity_id": TWO, "acs_urls": [ACS[TWO]], "slo_url": SLO[TWO], "name_id_format": "transient",
         "request_certificate": str(keys[TWO][0])},
        # three: no Single Logout endpoint registered: it cannot be told
        {"entity_id": THREE, "acs_urls": [ACS[THREE]], "name_id_format": "emailAddress", "name_id_source": "email"},
        # four: logout messages by HTTP-Redirect (query signatures)
        {"entity_id": FOUR, "acs_urls": [ACS[FOUR]], "slo_url": SLO[FOUR], "slo_binding": "redirect",
         "request_certificate": str(keys[FOUR][0])},
    ]
    site = LoginSite(directory, slapd, CA.create(), login={"saml": {"service_providers": providers}, "wsfed": {
        "relying_parties": [{"realm": "urn:example:realm", "reply_urls": [WSFED_REPLY]}]}, **login})
    site.keys = keys
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    login = build_site(tmp_path_factory.mktemp("slo"), slapd)
    login.gw = login.start()
    login.metadata = login.client().get(f"{login.url}/saml/metadata").text
    yield login
    login.stop()


def make_sp(site, tmp_path, entity_id: str, sign: bool = True) -> SamlSP:
    return SamlSP(tmp_path / urlsplit(entity_id).hostname, site.metadata, acs=ACS[entity_id], entity_id=entity_id,
                  slo=SLO[entity_id], keys=site.keys[entity_id], sign_logout=sign, sign_requests=True)


def answer(page) -> tuple[str, dict[str, str]]:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    return action, {n: hidden(page.text, n) for n in ("SAMLRequest", "SAMLResponse", "RelayState") if hidden(page.text, n)}


def sso(site, sp: SamlSP, browser, *, first: bool):
    request_id, location = sp.redirect_request()
    page = browser.get(location)
    if first:
        assert urlsplit(page.url).path == "/login"
        page = site.sign_in(browser, "alice", "Alice-pw-1", url=page.url)
    action, fields = answer(page)
    assert action == sp.acs
    return sp.accept(fields["SAMLResponse"], request_id)


def test_logout_at_one_sp_is_propagated_to_the_other_and_answered_success(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)
    sso(site, two, browser, first=False)
    at_two = sso(site, two, browser, first=False)  # the transient NameID logout must name: the last one
    # one session, each SP told its own SessionIndex of it (SessionManager.party_index)
    assert at_one.session_index != at_two.session_index
    assert at_one.session_index.partition(".")[0] == at_two.session_index.partition(".")[0]

    request_id, info = one.logout_request(f"{site.url}/saml/slo", at_one, relay_state="bye")
    assert "Signature=" in dict(info["headers"])["Location"]
    page = browser.get(dict(info["headers"])["Location"])
    # authgw sends the browser on to two, with a signed LogoutRequest naming the subject as issued to two
    action, fields = answer(page)
    assert action == SLO[TWO] and set(fields) == {"SAMLRequest"}
    assert "form-action https://two.example.test" in page.headers["Content-Security-Policy"]
    request, back_to, reply = two.receive_logout(fields["SAMLRequest"])
    assert request.name_id.text == at_two.name_id and request.name_id.text != at_one.name_id
    assert [i.text for i in request.session_index] == [at_two.session_index]
    assert request.issuer.text == f"{site.url}/saml/metadata" and request.destination == SLO[TWO]
    assert back_to == f"{site.url}/saml/slo" and "SAMLResponse" in reply
    # two's (signed) LogoutResponse goes back through the browser; authgw answers one
    page = browser.post(back_to, data=reply)
    action, fields = answer(page)
    assert action == SLO[ONE] and fields["RelayState"] == "bye"
    response = one.accept_logout(fields["SAMLResponse"])
    assert response.in_response_to == request_id
    assert response.status.status_code.value == STATUS + "Success" and response.status.status_code.status_code is None
    # the authgw session is gone: the next SSO shows the form again
    _, location = one.redirect_request()
    form = browser.get(location)
    assert urlsplit(form.url).path == "/login" and 'id="password"' in form.text
    # and the round is over: its LogoutResponse cannot be played again
    again = browser.post(back_to, data=reply)
    assert again.status_code == 400 and again.headers["X-Refused-Reason"] == "saml.logout_unknown"
    assert "single logout done: initiator=https://one.example.test/ told=https://two.example.test/ failed=-" \
        in site.gw.output()


def test_a_participant_without_slo_url_or_an_unsigned_answer_makes_it_partial(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO, sign=False)
    three = SamlSP(tmp_path / "three", site.metadata, acs=ACS[THREE], entity_id=THREE)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)
    sso(site, two, browser, first=False)
    sso(site, three, browser, first=False)
    _, info = one.logout_request(f"{site.url}/saml/slo", at_one)
    action, fields = answer(browser.get(dict(info["headers"])["Location"]))
    assert action == SLO[TWO]  # three has no slo_url: it is not sent anywhere
    _, back_to, reply = two.receive_logout(fields["SAMLRequest"])  # two answers unsigned: refused by authgw
    action, fields = answer(browser.post(back_to, data=reply))
    assert action == SLO[ONE]
    xml = base64.b64decode(fields["SAMLResponse"]).decode()
    assert f'Value="{STATUS}Success"><samlp:StatusCode Value="{STATUS}PartialLogout"' in xml
    # pysaml2 verifies it (signature, InResponseTo) and reports the second-level status
    response = one.accept_logout(fields["SAMLResponse"])
    assert response.status.status_code.status_code.value == STATUS + "PartialLogout"
    assert "did not confirm: reason=saml.signature_missing" in site.gw.output()
    assert 'id="password"' in browser.get(f"{site.url}/login").text


def test_tampered_logout_request_is_refused_by_the_sp(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)
    at_two = sso(site, two, browser, first=False)
    _, info = one.logout_request(f"{site.url}/saml/slo", at_one)
    _, fields = answer(browser.get(dict(info["headers"])["Location"]))
    xml = base64.b64decode(fields["SAMLRequest"]).decode()
    forged = base64.b64encode(xml.replace(at_two.name_id, "_someone-else").encode()).decode()
    with pytest.raises(Exception):
        two.receive_logout(forged)
    two.receive_logout(fields["SAMLRequest"])  # the genuine one passes


def test_sign_out_button_starts_an_idp_initiated_round(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
    browser = site.client()
    sso(site, one, browser, first=True)
    at_two = sso(site, two, browser, first=False)
    page = browser.get(f"{site.url}/login")
    assert "signed in as" in page.text
    # without the CSRF token nothing happens
    refused = browser.post(f"{site.url}/logout", data={})
    assert refused.status_code == 403
    page = browser.post(f"{site.url}/logout", data={"csrf": hidden(page.text, "csrf")})
    action, fields = answer(page)
    assert action in (SLO[ONE], SLO[TWO])
    first = one if action == SLO[ONE] else two
    _, back_to, reply = first.receive_logout(fields["SAMLRequest"])
    action, fields = answer(browser.post(back_to, data=reply))
    second = two if first is one else one
    assert action == SLO[second.entity_id]
    request, back_to, reply = second.receive_logout(fields["SAMLRequest"])
    if second is two:
        assert request.name_id.text == at_two.name_id
    done = browser.post(back_to, data=reply)
    assert done.status_code == 200 and "You are signed out." in done.text
    assert 'id="password"' in browser.get(f"{site.url}/login").text


def test_a_logout_request_naming_another_subject_does_not_end_that_session(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
    victim = site.client()
    at_one = sso(site, one, victim, first=True)
    forged = at_one.__class__(**{**at_one.__dict__, "name_id": "mallory"})
    _, info = one.logout_request(f"{site.url}/saml/slo", forged)
    page = site.client().get(dict(info["headers"])["Location"])  # another browser: no cookie
    action, fields = answer(page)
    assert action == SLO[ONE]  # answered, but the victim's session stays
    assert "signed in as" in victim.get(f"{site.url}/login").text
    # an SP that never got an assertion in that session cannot end it with its index either
    _, info = two.logout_request(f"{site.url}/saml/slo", at_one)
    assert answer(site.client().get(dict(info["headers"])["Location"]))[0] == SLO[TWO]
    assert "signed in as" in victim.get(f"{site.url}/login").text
    assert "named a session it has no part in" in site.gw.output()


def test_ws_federation_signout_tells_the_saml_sps_then_goes_to_its_reply(site, tmp_path):
    one = make_sp(site, tmp_path, ONE)
    browser = site.client()
    sso(site, one, browser, first=True)
    page = browser.get(f"{site.url}/wsfed", params={"wa": "wsignout1.0", "wreply": WSFED_REPLY})
    action, fields = answer(page)
    assert action == SLO[ONE]
    _, back_to, reply = one.receive_logout(fields["SAMLRequest"])
    done = browser.post(back_to, data=reply, allow_redirects=False)
    assert done.status_code == 303 and done.headers["Location"] == WSFED_REPLY
    assert 'id="password"' in browser.get(f"{site.url}/login").text


def test_the_round_works_across_workers_with_sessions_in_redis(tmp_path, slapd):
    redis = RedisServer(tmp_path / "redis").start()
    site = build_site(tmp_path / "site", slapd, sessions={"store": "redis", "redis_url": redis.url})
    try:
        site.gw = site.start(workers=2)
        site.metadata = site.client().get(f"{site.url}/saml/metadata").text
        one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
        browser = site.client()
        at_one = sso(site, one, browser, first=True)
        at_two = sso(site, two, browser, first=False)
        _, info = one.logout_request(f"{site.url}/saml/slo", at_one, relay_state="r")
        action, fields = answer(browser.get(dict(info["headers"])["Location"]))
        assert action == SLO[TWO]
        request, back_to, reply = two.receive_logout(fields["SAMLRequest"])
        assert request.name_id.text == at_two.name_id
        action, fields = answer(browser.post(back_to, data=reply))
        response = one.accept_logout(fields["SAMLResponse"])
        assert response.status.status_code.value == STATUS + "Success" and response.status.status_code.status_code is None
        assert all('id="password"' in browser.get(f"{site.url}/login").text for _ in range(4))  # both workers
    finally:
        site.stop()
        redis.stop()


def test_http_redirect_binding_both_ways(site, tmp_path):
    one, four = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, FOUR)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)
    at_four = sso(site, four, browser, first=False)
    # one logs out: four is sent a LogoutRequest by HTTP-Redirect, signed over the query
    _, info = one.logout_request(f"{site.url}/saml/slo", at_one)
    sent = browser.get(dict(info["headers"])["Location"], allow_redirects=False)
    assert sent.status_code == 303 and sent.headers["Location"].startswith(SLO[FOUR] + "?SAMLRequest=")
    request, back = four.receive_logout_redirect(sent.headers["Location"])
    assert request.name_id.text == at_four.name_id and [i.text for i in request.session_index] == [at_four.session_index]
    forged = sent.headers["Location"].replace("SigAlg=", "RelayState=x&SigAlg=")
    with pytest.raises(AssertionError):
        four._redirect_signature_ok(forged, "SAMLRequest")
    # four answers by HTTP-Redirect too (its query signature checked by authgw); one gets Success
    assert back.startswith(f"{site.url}/saml/slo?SAMLResponse=") and "Signature=" in back
    action, fields = answer(browser.get(back))
    assert action == SLO[ONE]
    assert one.accept_logout(fields["SAMLResponse"]).status.status_code.status_code is None
    assert "told=https://four.example.test/ failed=-" in site.gw.output()

    # four logs out: one gets a POSTed LogoutRequest, four its LogoutResponse by HTTP-Redirect
    at_four = sso(site, four, browser, first=True)
    sso(site, one, browser, first=False)
    request_id, info = four.logout_request(f"{site.url}/saml/slo", at_four, relay_state="four")
    action, fields = answer(browser.get(dict(info["headers"])["Location"]))
    assert action == SLO[ONE]
    _, back_to, reply = one.receive_logout(fields["SAMLRequest"])
    done = browser.post(back_to, data=reply, allow_redirects=False)
    assert done.status_code == 303 and done.headers["Location"].startswith(SLO[FOUR] + "?SAMLResponse=")
    response, relay_state = four.accept_logout_redirect(done.headers["Location"])
    assert response.in_response_to == request_id and relay_state == "four"
    assert response.status.status_code.value == STATUS + "Success" and response.status.status_code.status_code is None


def test_a_re_authentication_keeps_the_participants_and_the_session_index(site, tmp_path):
    one, two = make_sp(site, tmp_path, ONE), make_sp(site, tmp_path, TWO)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)
    request_id, location = two.redirect_request(force_authn="true")  # the user proves it again
    page = site.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(location).url)
    at_two = two.accept(answer(page)[1]["SAMLResponse"], request_id)
    # the same user's session goes on (each SP told its own SessionIndex of it)
    assert at_two.session_index.partition(".")[0] == at_one.session_index.partition(".")[0]
    # one logs out naming the index it got before the re-authentication: two is told
    _, info = one.logout_request(f"{site.url}/saml/slo", at_one)
    action, fields = answer(browser.get(dict(info["headers"])["Location"]))
    assert action == SLO[TWO]
    request, back_to, reply = two.receive_logout(fields["SAMLRequest"])
    assert request.name_id.text == at_two.name_id
    action, fields = answer(browser.post(back_to, data=reply))
    assert action == SLO[ONE]
    assert one.accept_logout(fields["SAMLResponse"]).status.status_code.value == STATUS + "Success"


def test_another_user_signing_in_over_a_session_leaves_its_participants_to_the_next_logout(site, tmp_path):
    one = make_sp(site, tmp_path, ONE)
    browser = site.client()
    at_one = sso(site, one, browser, first=True)  # alice
    assert "signed in as bob" in site.sign_in(browser, "bob", "Bob-pw-1").text
    # the old SessionIndex names no session any more: alice's SP cannot end bob's
    _, info = one.logout_request(f"{site.url}/saml/slo", at_one)
    assert answer(site.client().get(dict(info["headers"])["Location"]))[0] == SLO[ONE]
    page = browser.get(f"{site.url}/login")
    assert "signed in as bob" in page.text
    # bob's Sign out still tells one about alice, as issued to it
    action, fields = answer(browser.post(f"{site.url}/logout", data={"csrf": hidden(page.text, "csrf")}))
    assert action == SLO[ONE]
    request, back_to, reply = one.receive_logout(fields["SAMLRequest"])
    assert request.name_id.text == at_one.name_id and [i.text for i in request.session_index] == [at_one.session_index]
    assert "You are signed out." in browser.post(back_to, data=reply).text
