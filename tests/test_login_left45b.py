"""SAML requests whose answer is an error, at an address whose budget is spent, through a real
``authgw serve`` in front of slapd; every Response is checked by pysaml2 (``xmlsec1``: the
signature, Destination, InResponseTo, Issuer, then its status).

The requests come through the gateway's plain listener from a trusted proxy (``X-Forwarded-For``),
each test from its own address; the session cookies are not ``Secure`` here so that they travel
on that listener. The door's budget is 5, so that few requests spend it; a budget is spent by
sending requests until one is refused, so no assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import re

import pytest
import requests
from saml2.response import StatusNoAuthnContext, StatusNoPassive, StatusRequestDenied
from saml2.saml import AuthnContextClassRef
from saml2.samlp import RequestedAuthnContext

from support.login import hidden
from support.logindoor import no_5xx, saml_door

BUDGET = 5
#: More requests than a budget of 5 and what it refills while they are sent.
FLOOD = 60
SP_ID = "https://sp.example.test/"
ACS = "https://sp.example.test/acs"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
KERBEROS = "urn:oasis:names:tc:SAML:2.0:ac:classes:Kerberos"


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    login = {
        "sessions": {"requests_per_client": BUDGET, "secure_cookie": False},
        "saml": {"service_providers": [{"entity_id": SP_ID, "acs_urls": [ACS], "name_id_format": "persistent"}]},
    }
    with saml_door(tmp_path_factory.mktemp("left45b"), login, sp_id=SP_ID, acs=ACS) as site:
        yield site


class Proxied:
    """A browser behind a trusted proxy that forwards it as *address*: addresses at ``base_url``
    are sent to the gateway's plain listener with ``X-Forwarded-For``."""

    def __init__(self, door, address: str) -> None:
        self.door, self.address = door, address
        self.session = requests.Session()
        self.session.trust_env = False

    def _url(self, location: str) -> str:
        if location.startswith("/"):
            return self.door.gw.url + location
        assert location.startswith(self.door.url), location
        return self.door.gw.url + location[len(self.door.url):]

    def get(self, location: str) -> requests.Response:
        return self.session.get(self._url(location), headers={"X-Forwarded-For": self.address},
                                allow_redirects=False, timeout=15)

    def post(self, location: str, data: dict) -> requests.Response:
        return self.session.post(self._url(location), data=data, headers={"X-Forwarded-For": self.address},
                                 allow_redirects=False, timeout=15)


def spend_budget(door, browser: Proxied) -> None:
    """Park AuthnRequests from *browser*'s address until one is not parked (the budget is spent)."""
    for _ in range(FLOOD):
        _, location = door.sp.redirect_request(relay_state="flood")
        if not browser.get(location).headers.get("Location", "").startswith("/login?req="):
            return
    pytest.fail(f"{FLOOD} AuthnRequests from one address were all parked")


def answered(door, page, request_id: str, relay_state: str, error: type[Exception], second: str) -> str:
    """*page* posts a signed error Response (Responder or Requester / *second*) for *request_id*
    with *relay_state* to the ACS, and nothing else; pysaml2 accepts it up to its status."""
    assert page.status_code == 200, (page.status_code, page.text[:300])
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert action and action.group(1) == ACS
    assert hidden(page.text, "RelayState") == relay_state
    with pytest.raises(error):
        door.sp.accept(hidden(page.text, "SAMLResponse"), request_id)
    xml = base64.b64decode(hidden(page.text, "SAMLResponse")).decode()
    assert re.search(rf'<samlp:StatusCode Value="{STATUS}\w+">\s*<samlp:StatusCode Value="{STATUS}{second}"/>', xml)
    assert "Assertion" not in xml and "<ds:Signature" in xml
    return xml


def test_an_at_once_error_past_the_addresses_budget_is_request_denied_at_the_acs(door):
    """A request answered with an error at once (an unsupported NameIDPolicy, an authentication
    context no sign-in here meets) from an address whose budget is spent got the 429 HTML page,
    which an SP's IsPassive request may not show: it is answered at the ACS with
    Responder/RequestDenied, as every other request of that SP then is, within the same bound
    of such answers, past which the page comes back and nothing is signed. Its RelayState goes
    back as it came (escaped in the page, never written into it as markup)."""
    browser = Proxied(door, "203.0.113.90")
    spend_budget(door, browser)
    relay_state = '"><script>alert(1)</script>&amp;'
    request_id, location = door.sp.redirect_request(relay_state=relay_state, nameid_format=EMAIL)
    page = browser.get(location)
    answered(door, page, request_id, relay_state, StatusRequestDenied, "RequestDenied")
    assert page.headers["X-Refused-Reason"] == "login.too_many_requests" and int(page.headers["Retry-After"]) >= 1
    assert "<script>alert" not in page.text
    unmet = RequestedAuthnContext(authn_context_class_ref=[AuthnContextClassRef(text="urn:example:no-such-class")])
    request_id, location = door.sp.redirect_request(relay_state="ctx", requested_authn_context=unmet)
    answered(door, browser.get(location), request_id, "ctx", StatusRequestDenied, "RequestDenied")
    for _ in range(FLOOD):  # the bound of the error Responses for this address
        request_id, location = door.sp.redirect_request(relay_state="again", nameid_format=EMAIL)
        page = browser.get(location)
        if "SAMLResponse" not in page.text:
            break
        answered(door, page, request_id, "again", StatusRequestDenied, "RequestDenied")
    else:
        pytest.fail(f"{FLOOD} refused AuthnRequests from one address were all answered with a signed Response")
    assert page.status_code == 429 and page.headers["X-Refused-Reason"] == "login.too_many_requests"
    no_5xx(door)


def test_a_posted_is_passive_request_is_declined_no_passive_once_its_address_is_spent(door):
    """An HTTP-POST IsPassive request without the session cookie is parked for /login (its
    address's token spent then). Declined there (no session), its NoPassive spent a second
    token: once the address's budget was spent meanwhile (other users behind one NAT), it got
    the 429 HTML page, which it may not show, and its record was used up. It is told NoPassive
    at its ACS."""
    browser = Proxied(door, "203.0.113.91")
    request_id, fields = door.sp.post_request(relay_state="passive", is_passive="true")
    parked = browser.post(f"{door.url}/saml/sso", fields)
    location = parked.headers.get("Location", "")
    assert parked.status_code == 303 and location.startswith("/login?req="), (parked.status_code, parked.text[:300])
    spend_budget(door, Proxied(door, "203.0.113.91"))
    page = browser.get(location)
    answered(door, page, request_id, "passive", StatusNoPassive, "NoPassive")
    assert page.headers["X-Refused-Reason"] == "saml.no_passive"
    again = browser.get(location)  # declined once: the record is used up
    assert "SAMLResponse" not in again.text
    no_5xx(door)


def test_a_sign_in_from_a_spent_address_gets_its_error_answer_and_keeps_its_session(door):
    """A request waiting at /login whose answer after the sign-in is an error (here an
    authentication context a password does not meet) spent a token of the address's budget for
    it: a user who signed in from an address spent meanwhile got the 429 page after a
    successful sign-in, no session cookie (the session was made, unreachable), the request
    used up and the SP never told. The answer is counted as the sign-in was (as an assertion
    would be): the SP is told NoAuthnContext and the session is the browser's."""
    browser = Proxied(door, "203.0.113.92")
    kerberos = RequestedAuthnContext(authn_context_class_ref=[AuthnContextClassRef(text=KERBEROS)])
    request_id, location = door.sp.redirect_request(relay_state="ctx", requested_authn_context=kerberos)
    parked = browser.get(location)
    login = parked.headers.get("Location", "")
    assert login.startswith("/login?req="), (parked.status_code, parked.text[:300])
    spend_budget(door, Proxied(door, "203.0.113.92"))
    form = browser.get(login)
    assert form.status_code == 200 and hidden(form.text, "req")
    page = browser.post("/login", {"csrf": hidden(form.text, "csrf"), "req": hidden(form.text, "req"),
                                   "username": "alice", "password": "Alice-pw-1"})
    answered(door, page, request_id, "ctx", StatusNoAuthnContext, "NoAuthnContext")
    assert page.headers["X-Refused-Reason"] == "saml.authn_context_unmet"
    assert "authgw_session=" in page.headers.get("Set-Cookie", "")
    assert "alice" in browser.get("/login").text.lower()  # the "signed in as" page: the session is there
    no_5xx(door)
