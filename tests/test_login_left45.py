"""Items left by earlier reviews of the login door, each through a real ``authgw serve`` in front
of slapd: the CSRF origin check on a door whose ``base_url`` is https, the token endpoint's
budget of failed client authentications (clients of one cloud share an address), SAML requests
that cannot be served now (answered at the ACS, checked by pysaml2 with ``xmlsec1``), and HEAD
on ``/login?req=`` (a link prefetcher). The door's budget is 5 here, so that few requests spend
it; no assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import re
import secrets
from urllib.parse import urlsplit

import pytest
import requests
from saml2.response import StatusRequestDenied

from support.login import hidden
from support.logindoor import no_5xx, saml_door

BUDGET = 5
#: More requests than a budget of 5 and what it refills while they are sent.
FLOOD = 60
SP_ID = "https://sp.example.test/"
ACS = "https://sp.example.test/acs"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
APP = {"client_id": "app", "redirect_uris": ["https://app.example.test/cb"], "client_secret": {"env": "APP_SECRET"}}
OTHER = {"client_id": "other", "redirect_uris": ["https://other.example.test/cb"],
         "client_secret": {"env": "OTHER_SECRET"}}
SECRETS = {"APP_SECRET": "s3cret-s3cret-s3cret", "OTHER_SECRET": "0ther-0ther-0ther-0ther"}


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    login = {
        "sessions": {"requests_per_client": BUDGET},
        "oidc": {"clients": [APP, OTHER]},
        "saml": {"service_providers": [{"entity_id": SP_ID, "acs_urls": [ACS], "idp_initiated": True}]},
    }
    with saml_door(tmp_path_factory.mktemp("left45"), login, sp_id=SP_ID, acs=ACS, env=SECRETS) as site:
        yield site


# -- the CSRF origin check ----------------------------------------------------------------------


def test_an_http_origin_of_the_doors_https_host_is_another_site(door):
    """``base_url`` is https; a proxy that ends TLS reaches the door in plain http with the
    public Host. The door took ``Origin: http://<that host>`` (a plain-http page of the same
    host, which anyone on the path can write) as its own origin: scheme, host and port must all
    be ``base_url``'s."""
    host = urlsplit(door.url).netloc
    browser = requests.Session()
    browser.trust_env = False
    headers = {"Host": host, "X-Forwarded-For": "203.0.113.60"}
    page = browser.get(f"{door.gw.url}/login", headers=headers, timeout=15)
    # The CSRF cookie is Secure (a __Host- cookie): sent here by hand, as a browser on https would.
    cookie = re.match(r"(__Host-authgw_csrf=[^;]+)", page.headers["Set-Cookie"]).group(1)
    form = {"csrf": hidden(page.text, "csrf"), "username": "alice", "password": "Alice-pw-1"}

    def post(origin: str):
        return browser.post(f"{door.gw.url}/login", data=form, allow_redirects=False, timeout=15,
                            headers={**headers, "Cookie": cookie, "Origin": origin})

    for origin in (f"http://{host}", f"HTTP://{host.upper()}"):
        refused = post(origin)
        assert refused.status_code == 403, (origin, refused.status_code)
        assert refused.headers.get("X-Refused-Reason") == "login.cross_site"
        assert "authgw_session" not in refused.headers.get("Set-Cookie", "")
    signed_in = post(door.url)  # base_url's own origin: the form is taken
    assert signed_in.status_code == 200 and "__Host-authgw_session=" in signed_in.headers["Set-Cookie"]
    # On the door's own https listener its own origin is still its own.
    tls = door.client()
    page = tls.get(f"{door.url}/login", timeout=15)
    form = {"csrf": hidden(page.text, "csrf"), "username": "alice", "password": "Alice-pw-1"}
    answer = tls.post(f"{door.url}/login", data=form, headers={"Origin": door.url}, allow_redirects=False, timeout=15)
    assert answer.status_code == 200 and "__Host-authgw_session=" in answer.headers["Set-Cookie"]
    no_5xx(door)


# -- the token endpoint's budget of failed client authentications --------------------------------


def token(door, address: str, *, auth=None, **fields):
    body = {"grant_type": "authorization_code", "code": "no-such-code", "code_verifier": "v" * 43,
            "redirect_uri": "https://other.example.test/cb", **fields}
    return door.client().post(f"{door.gw.url}/oidc/token", data=body, auth=auth, timeout=15,
                              headers={"X-Forwarded-For": address})


def fail_until_refused(send) -> int:
    """Send failed client authentications until one is not a 401: how many were 401 first."""
    for failed in range(FLOOD):
        answer = send(failed)
        if answer.status_code != 401:
            assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1, answer.text
            return failed
        assert answer.json()["error"] == "invalid_client"
    pytest.fail(f"{FLOOD} failed client authentications were all answered 401")


def test_one_clients_failed_authentications_do_not_spend_anothers_budget(door):
    """Clients of one cloud share an address: one tenant's wrong secret locked every other
    client out of the token endpoint from there (429, whatever its secret). The budget is now
    per address and registered client claimed; made-up client ids share one budget, so they buy
    no new guesses."""
    address = "203.0.113.70"
    assert fail_until_refused(lambda n: token(door, address, auth=("app", f"guess-{n}"))) >= BUDGET
    assert token(door, address, auth=("app", SECRETS["APP_SECRET"])).status_code == 429  # not told, past it
    # Another client from the same address authenticates (no such code: invalid_grant, 400).
    other = token(door, address, auth=("other", SECRETS["OTHER_SECRET"]))
    assert (other.status_code, other.json()["error"]) == (400, "invalid_grant"), other.text
    other = token(door, address, client_id="other", client_secret=SECRETS["OTHER_SECRET"])
    assert (other.status_code, other.json()["error"]) == (400, "invalid_grant"), other.text
    # Its own guesses are bounded as app's were, in either way of sending a secret.
    assert fail_until_refused(lambda n: token(door, address, client_id="other", client_secret=f"g{n}")) >= BUDGET
    assert token(door, address, auth=("other", "guess")).status_code == 429
    # Ids no client has share one budget at an address: a new one each time is no new budget.
    assert fail_until_refused(lambda n: token(door, address, auth=(f"nobody-{n}", "x"))) >= BUDGET
    assert token(door, address, client_id="nobody-else", client_secret="x").status_code == 429
    assert token(door, address, auth=("other-nobody", "x")).status_code == 429
    output = door.gw.output()
    assert output.count(f"reason=oidc.too_many_client_failures client={address} client_id=app ") == 1
    assert output.count(f"reason=oidc.too_many_client_failures client={address} client_id=other ") == 1
    assert "guess-" not in output and SECRETS["APP_SECRET"] not in output and SECRETS["OTHER_SECRET"] not in output
    no_5xx(door)


# -- SAML requests that cannot be served now --------------------------------------------------------


def auto_post(page) -> tuple[str, dict[str, str]]:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert action, (page.status_code, page.text[:300])
    return action.group(1), {name: hidden(page.text, name) for name in ("SAMLResponse", "RelayState")
                             if hidden(page.text, name)}


def request_denied(door, page, request_id: str, relay_state: str) -> None:
    """*page* posts a signed Responder/RequestDenied Response for *request_id* to the ACS (pysaml2
    checks its signature, Destination, InResponseTo and Issuer, then raises its status)."""
    action, fields = auto_post(page)
    assert action == ACS and fields.get("RelayState") == relay_state
    with pytest.raises(StatusRequestDenied):
        door.sp.accept(fields["SAMLResponse"], request_id)
    xml = base64.b64decode(fields["SAMLResponse"]).decode()
    assert re.search(rf'<samlp:StatusCode Value="{STATUS}Responder">\s*<samlp:StatusCode '
                     rf'Value="{STATUS}RequestDenied"/>', xml)
    assert "Assertion" not in xml and "<ds:Signature" in xml
    assert page.headers["X-Refused-Reason"] == "login.too_many_requests"
    assert int(page.headers["Retry-After"]) >= 1 and page.headers["Cache-Control"] == "no-store"


def forwarded(door, browser, location: str, address: str):
    """GET *location* (an address at ``base_url``) through the main listener, as a trusted proxy
    forwards a request from *address*."""
    assert location.startswith(door.url)
    return browser.get(door.gw.url + location[len(door.url):], headers={"X-Forwarded-For": address},
                       allow_redirects=False, timeout=15)


def flood_saml(door, browser, address: str, **kw):
    """SAML AuthnRequests (HTTP-Redirect) from *address* until one is not sent to /login: how
    many were, and that answer with its request id and RelayState."""
    for served in range(FLOOD):
        relay_state = f"rs-{served}"
        request_id, location = door.sp.redirect_request(relay_state=relay_state, **kw)
        answer = forwarded(door, browser, location, address)
        if not answer.headers.get("Location", "").startswith("/login?req="):
            return served, answer, request_id, relay_state
    pytest.fail(f"{FLOOD} AuthnRequests from one address were all parked")


def test_an_sps_request_past_the_addresses_budget_is_answered_at_its_acs(door):
    """A spent budget (429) was an HTML page at the door: an SP whose request is verified (a
    known SP, a registered ACS) never learned why the user did not come back, and an IsPassive
    request, which may show no page, got one. It is answered at the ACS with a signed
    Responder/RequestDenied Response, as OIDC answers at the redirect_uri; those answers have a
    bound of their own (each is signed), past which the page comes back."""
    browser, address = door.client(), "203.0.113.80"
    served, answer, request_id, relay_state = flood_saml(door, browser, address)
    assert served >= BUDGET
    request_denied(door, answer, request_id, relay_state)
    # IsPassive too: no page, the SP is told.
    request_id, location = door.sp.redirect_request(relay_state="passive", is_passive="true")
    passive = forwarded(door, browser, location, address)
    request_denied(door, passive, request_id, "passive")
    # The error Responses are bounded too: then the 429 page, nothing signed.
    for _ in range(FLOOD):
        request_id, location = door.sp.redirect_request(relay_state="again")
        answer = forwarded(door, browser, location, address)
        if "SAMLResponse" not in answer.text:
            break
        request_denied(door, answer, request_id, "again")
    else:
        pytest.fail(f"{FLOOD} refused AuthnRequests from one address were all answered with a signed Response")
    assert answer.status_code == 429 and answer.headers["X-Refused-Reason"] == "login.too_many_requests"
    # An IdP-initiated request asks no SP: the page, not an unsolicited error at the ACS.
    idp = browser.get(f"{door.gw.url}/saml/idp", params={"sp": SP_ID}, headers={"X-Forwarded-For": "203.0.113.81"},
                      allow_redirects=False, timeout=15)
    assert idp.status_code == 303  # (another address: parked)
    for _ in range(FLOOD):
        idp = browser.get(f"{door.gw.url}/saml/idp", params={"sp": SP_ID},
                          headers={"X-Forwarded-For": "203.0.113.81"}, allow_redirects=False, timeout=15)
        if idp.status_code != 303:
            break
    assert idp.status_code == 429 and "SAMLResponse" not in idp.text
    no_5xx(door)


def test_answers_past_a_users_budget_are_request_denied_at_the_acs(door):
    """A signed-in user's answers from the session past the user's budget (429) got the page;
    now the SP is told at its ACS, for a request answered at once and for one that waited at
    /login (an HTTP-POST AuthnRequest, whose cross-site POST carries no cookie)."""
    browser = door.client()
    request_id, location = door.sp.redirect_request()
    page = door.sign_in(browser, "alice", "Alice-pw-1", url=browser.get(location, timeout=15).url)
    door.sp.accept(auto_post(page)[1]["SAMLResponse"], request_id)
    for _ in range(FLOOD):  # answered from the session: nothing parked, the user's budget spent
        request_id, location = door.sp.redirect_request(relay_state="again")
        answer = browser.get(location, allow_redirects=False, timeout=15)
        if answer.headers.get("X-Refused-Reason"):
            break
        door.sp.accept(auto_post(answer)[1]["SAMLResponse"], request_id)
    else:
        pytest.fail("a user's answers from its session were never refused")
    request_denied(door, answer, request_id, "again")
    # By HTTP-POST without the cookie: parked for /login, refused there, told at the ACS, used up.
    request_id, fields = door.sp.post_request(relay_state="posted")
    cookies = browser.cookies
    browser.cookies = requests.cookies.RequestsCookieJar()
    parked = browser.post(f"{door.url}/saml/sso", data=fields, allow_redirects=False, timeout=15)
    browser.cookies = cookies
    location = parked.headers["Location"]
    assert location.startswith("/login?req=")
    answer = browser.get(f"{door.url}{location}", allow_redirects=False, timeout=15)
    request_denied(door, answer, request_id, "posted")
    again = browser.get(f"{door.url}{location}", allow_redirects=False, timeout=15)
    assert "SAMLResponse" not in again.text  # answered once: the id is used up
    no_5xx(door)


# -- HEAD on /login?req= ------------------------------------------------------------------------------


def test_head_on_a_parked_request_neither_uses_it_up_nor_answers_it(door):
    """A link prefetcher (a mail scanner) sends HEAD: a parked request meant for the browser,
    a prompt=none one included (declined when read without a session), must wait for it."""
    browser = door.client()
    params = {"client_id": "app", "redirect_uri": "https://app.example.test/cb", "response_type": "code",
              "scope": "openid", "code_challenge": "a" * 43, "code_challenge_method": "S256",
              "state": secrets.token_hex(8), "prompt": "none", "response_mode": "query"}
    # A POST without the cookie waits at /login (its cross-site POST carries none).
    parked = browser.post(f"{door.url}/oidc/authorize", data=params, allow_redirects=False, timeout=15)
    location = parked.headers["Location"]
    assert location.startswith("/login?req="), (parked.status_code, parked.text[:300])
    scanner = door.client()
    for _ in range(3):
        head = scanner.head(f"{door.url}{location}", allow_redirects=False, timeout=15)
        assert head.status_code in (200, 405) and "Location" not in head.headers
    # The browser (no session) then gets the declined answer: the request was still there.
    answer = browser.get(f"{door.url}{location}", allow_redirects=False, timeout=15)
    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("https://app.example.test/cb?error=login_required&")
    assert f"state={params['state']}" in answer.headers["Location"]
    no_5xx(door)
