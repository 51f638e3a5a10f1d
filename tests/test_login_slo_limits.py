"""Limits of SAML Single Logout for anyone (review: a 1 KB unsigned LogoutRequest with 8,500
``SessionIndex`` elements made 8,500 blocking store lookups on the worker's event loop, 1.2 s with
Redis; unsigned LogoutRequests got signed LogoutResponses without limit, ``Success`` even when
they ended nothing).

Through a real ``authgw serve`` with its sessions in a real ``redis-server``, whose slow log (every
command logged, with its arguments: ``slowlog-log-slower-than 0``) shows which store lookups a
request made; the SP is pysaml2 for sign-in and for checking authgw's answers, the LogoutRequests
are written by hand (unsigned, as an SP without ``request_certificate`` sends them, or as anyone
can). Each test has a client address of its own (``X-Forwarded-For`` from a trusted proxy), so
their budgets do not mix. No assertion depends on how fast anything runs."""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import zlib
from urllib.parse import urlencode, urlsplit

import pytest
from lxml import etree

from gateway.plugins.login.sessions import SqliteStore

from support.login import LoginSite, hidden
from support.pki import CA
from support.redis import RedisServer
from support.saml_sp import SamlSP
from support.slapd import Slapd

SP, ACS, SLO = "https://sp.example.test/", "https://sp.example.test/acs", "https://sp.example.test/slo"
SAMLP, SAML = "urn:oasis:names:tc:SAML:2.0:protocol", "urn:oasis:names:tc:SAML:2.0:assertion"
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
#: ``sessions.requests_per_client`` here: small, so that a flood is short.
BUDGET = 5
#: More requests than the budget and what it can refill while they are sent (BUDGET a minute).
FLOOD = 40


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("slo-limits")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    redis = RedisServer(base / "redis").start()
    login = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]}, login={
        "sessions": {"store": "redis", "redis_url": redis.url, "requests_per_client": BUDGET},
        # no request_certificate: its LogoutRequests are unsigned, and so is anyone's in its name
        "saml": {"service_providers": [{"entity_id": SP, "acs_urls": [ACS], "slo_url": SLO,
                                        "name_id_format": "emailAddress", "name_id_source": "email"}]}})
    login.gw = login.start()
    login.metadata = login.client().get(f"{login.url}/saml/metadata").text
    login.redis = redis.client()
    login.redis.config_set("slowlog-log-slower-than", 0)  # every command, with its arguments
    login.redis.config_set("slowlog-max-len", 100_000)
    yield login
    login.stop()
    redis.stop()
    slapd.stop()


def logout_request(site, indexes: list[str], name_id: str = "nobody@example.com", request_id: str = "") -> bytes:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f'<samlp:LogoutRequest xmlns:samlp="{SAMLP}" xmlns:saml="{SAML}" '
            f'ID="{request_id or "_" + secrets.token_hex(8)}" Version="2.0" IssueInstant="{now}" '
            f'Destination="{site.url}/saml/slo"><saml:Issuer>{SP}</saml:Issuer>'
            f'<saml:NameID Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress">{name_id}</saml:NameID>'
            + "".join(f"<samlp:SessionIndex>{index}</samlp:SessionIndex>" for index in indexes)
            + "</samlp:LogoutRequest>").encode()


def send(site, xml: bytes, client: str, relay_state: str = ""):
    """*xml* by HTTP-Redirect (unsigned), from the client address *client* (behind the trusted proxy)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    query = {"SAMLRequest": base64.b64encode(packer.compress(xml) + packer.flush()).decode()}
    if relay_state:
        query["RelayState"] = relay_state
    return site.client().get(f"{site.gw.url}/saml/slo?" + urlencode(query), headers={"X-Forwarded-For": client},
                             allow_redirects=False, timeout=15)


def index_lookups(site) -> list[list[str]]:
    """The reads (``GET``, ``MGET``) of SessionIndex records Redis ran since the last call (its
    slow log, which logs every command here, those of Lua scripts too), oldest first; the log is
    emptied."""
    entries = site.redis.slowlog_get(100_000)
    site.redis.slowlog_reset()
    commands = [entry["command"].decode().split() for entry in reversed(entries)]
    return [command for command in commands
            if command[0].upper() in ("GET", "MGET") and any(":p:idx:" in arg for arg in command[1:])]


def logout_response(page) -> etree._Element:
    """The LogoutResponse on the answer page, after checking it is posted to the SP's ``slo_url``."""
    assert page.status_code == 200, (page.status_code, page.headers.get("X-Refused-Reason"), page.text[:300])
    assert re.search(r'<form method="post" action="([^"]+)"', page.text).group(1) == SLO
    return etree.fromstring(base64.b64decode(hidden(page.text, "SAMLResponse")))


def status_codes(response: etree._Element) -> list[str]:
    return [code.get("Value") for code in response.iter(f"{{{SAMLP}}}StatusCode")]


def test_more_than_16_session_indexes_are_malformed_and_none_is_looked_up(site):
    index_lookups(site)
    for indexes in ([f"_probe{n}" for n in range(17)],  # one more than the limit
                    ["a"] * 6000):                       # the review's kind: 1 KB deflated, < max_inflated_bytes
        page = send(site, logout_request(site, indexes), "203.0.113.1")
        assert page.status_code == 400, (page.status_code, page.text[:300])
        assert page.headers["X-Refused-Reason"] == "login.malformed"
        assert "This sign-in request cannot be accepted." in page.text
        assert "_probe" not in page.text and "SAMLResponse" not in page.text  # nothing echoed, nothing signed
        assert index_lookups(site) == []


def test_sixteen_session_indexes_are_read_in_one_round_trip(site):
    indexes = [f"_unknown{n}" for n in range(16)]
    index_lookups(site)
    response = logout_response(send(site, logout_request(site, indexes), "203.0.113.2"))
    assert response.tag == f"{{{SAMLP}}}LogoutResponse"
    # one MGET of the 16 records, not a GET each on the worker's event loop
    assert index_lookups(site) == [["MGET", *(f"authgw:login:p:idx:{index}" for index in indexes)]]


def test_a_request_that_ends_no_session_is_answered_success_and_logged(site, tmp_path):
    """Nothing to end (the usual case: the user's authgw session expired before they signed out
    at the SP) is the state logout asks for: ``Success``, which pysaml2 accepts, not an error
    the SP would show for a logout that held."""
    request_id = "_" + secrets.token_hex(8)
    page = send(site, logout_request(site, ["_bogus"], request_id=request_id), "203.0.113.3", relay_state="rs")
    response = logout_response(page)
    assert status_codes(response) == [STATUS + "Success"]
    assert response.get("InResponseTo") == request_id and hidden(page.text, "RelayState") == "rs"
    assert "ended no session" in site.gw.output()
    sp = SamlSP(tmp_path / "sp", site.metadata, acs=ACS, entity_id=SP, slo=SLO)
    sp.accept_logout(hidden(page.text, "SAMLResponse"))  # checks the signature and the status


def signed_in_at_sp(site, tmp_path):
    """alice signed in at the SP through pysaml2: the SP, her browser, and what the SP accepted."""
    sp = SamlSP(tmp_path / "sp", site.metadata, acs=ACS, entity_id=SP, slo=SLO)
    browser = site.client()
    request_id, location = sp.redirect_request()
    page = browser.get(location)
    assert urlsplit(page.url).path == "/login"
    signed_in = sp.accept(hidden(site.sign_in(browser, "alice", "Alice-pw-1", url=page.url).text, "SAMLResponse"),
                          request_id)
    assert "signed in as" in browser.get(f"{site.url}/login").text
    return sp, browser, signed_in


def test_a_session_index_named_twice_is_read_once_and_its_session_ends(site, tmp_path):
    sp, browser, signed_in = signed_in_at_sp(site, tmp_path)
    index_lookups(site)
    xml = logout_request(site, [signed_in.session_index] * 2, name_id=signed_in.name_id)
    page = send(site, xml, "203.0.113.4")
    assert status_codes(logout_response(page)) == [STATUS + "Success"]  # the session did end
    assert sp.accept_logout(hidden(page.text, "SAMLResponse")).status.status_code.status_code is None
    # one MGET naming it once (the end of the session reads it again, inside its Lua script)
    reads = index_lookups(site)
    session_index = signed_in.session_index.partition(".")[0]  # the session's own, as the SP's names it
    assert [read for read in reads if read[0] == "MGET"] == [["MGET", f"authgw:login:p:idx:{session_index}"]]
    assert 'id="password"' in browser.get(f"{site.url}/login").text  # signed out


def test_a_flood_of_unsigned_logout_requests_from_one_client_is_refused_after_its_budget(site):
    xml = logout_request(site, ["_flood"])
    for served in range(FLOOD):
        page = send(site, xml, "203.0.113.5")
        if page.status_code != 200:
            break
        logout_response(page)
    else:
        pytest.fail(f"{FLOOD} unsigned LogoutRequests from one address were all answered")
    assert served >= BUDGET  # the burst is served whole
    assert page.status_code == 429, (page.status_code, page.text[:300])
    assert page.headers["X-Refused-Reason"] == "login.too_many_requests"
    assert int(page.headers["Retry-After"]) >= 1
    assert hidden(page.text, "SAMLResponse") is None  # nothing signed
    index_lookups(site)
    page = send(site, xml, "203.0.113.5")
    assert page.status_code == 429 and "SAMLResponse" not in page.text  # refused, nothing signed
    # A refused one costs its single bounded lookup (whether it would end a session is known only
    # after it: one that does is never refused), and no more: one MGET of the one index.
    assert index_lookups(site) == [["MGET", "authgw:login:p:idx:_flood"]]
    # another client behind the same trusted proxy has a budget of its own
    logout_response(send(site, xml, "203.0.113.6"))


def test_a_logout_that_ends_the_users_session_is_answered_when_their_address_has_spent_its_budget(site, tmp_path):
    """Users behind one NAT share their address's budget with its sign-ins: a user who signs out
    at the SP once it is spent still ends their authgw session (refused, it would survive, and
    the next sign-in at the SP would be silent: a shared machine). Only requests that end no
    session spend the budget."""
    client = "203.0.113.7"
    sp, browser, signed_in = signed_in_at_sp(site, tmp_path)
    # the address's budget spent by requests that end nothing (others behind the same NAT)
    nothing = logout_request(site, ["_spent"])
    for _ in range(FLOOD):
        page = send(site, nothing, client)
        if page.status_code != 200:
            break
    else:
        pytest.fail(f"{FLOOD} unsigned LogoutRequests from one address were all answered")
    assert page.status_code == 429 and page.headers["X-Refused-Reason"] == "login.too_many_requests"
    # the user's own logout, from that address, names their live session: it ends and is answered
    request_id = "_" + secrets.token_hex(8)
    xml = logout_request(site, [signed_in.session_index], name_id=signed_in.name_id, request_id=request_id)
    page = send(site, xml, client, relay_state="rs")
    response = logout_response(page)
    assert status_codes(response) == [STATUS + "Success"] and response.get("InResponseTo") == request_id
    assert hidden(page.text, "RelayState") == "rs"
    assert sp.accept_logout(hidden(page.text, "SAMLResponse")).status.status_code.status_code is None
    assert 'id="password"' in browser.get(f"{site.url}/login").text  # signed out: the next sign-in asks
    # the budget is still spent for requests that end nothing; the same one again ends nothing now
    for again in (nothing, xml):
        page = send(site, again, client)
        assert page.status_code == 429 and page.headers["X-Refused-Reason"] == "login.too_many_requests"
        assert "SAMLResponse" not in page.text


def test_the_sqlite_store_reads_several_pending_records_in_one_statement(tmp_path):
    store = SqliteStore(tmp_path / "sessions.sqlite3")
    try:
        store.put_pending("idx:_live", {"key": "k1"}, 2000.0)
        store.put_pending("idx:_over", {"key": "k2"}, 500.0)
        statements = []
        store.db.set_trace_callback(statements.append)
        found = store.get_pendings(["idx:_live", "idx:_over", "idx:_none"], now=1000.0)
        assert found == {"idx:_live": {"key": "k1"}}  # an expired record is not found
        assert len(statements) == 1
        assert store.get_pendings([], now=1000.0) == {}
    finally:
        store.close()
