"""Issue 13, step 2-3: one relay and two connectors (all ``authgw serve``) in front of a real
slapd. Logins through the relay's ``/auth`` and ``/v1/authenticate`` travel the link."""

from __future__ import annotations

import pytest

from support.linkenv import Connector, Relay
from support.slapd import Slapd


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-Passw0rd", cn="Bob B", mail="bob@example.com", groups=["ops"])
    server.add_user("carol", "Carol-Passw0rd", cn="Carol C", mail="carol@example.com")  # never cached
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    """A relay with two enrolled, linked connectors (shared: a test that stops one restarts it)."""
    tmp_path = tmp_path_factory.mktemp("site")
    relay = Relay(tmp_path / "relay").setup().start()
    connectors = []
    try:
        for name in ("c1", "c2"):
            connectors.append(Connector(tmp_path / name, slapd).enroll(relay.ticket(), relay.ca_file).start())
        for connector in connectors:
            connector.wait_linked(relay)
        yield relay, connectors
    finally:
        for connector in connectors:
            connector.stop()
        relay.stop()


def test_password_logins_through_the_relay(site, slapd):
    relay, connectors = site
    before = sum(len(c.process.audit()) for c in connectors)
    ok = relay.process.auth("alice", "Alice-Passw0rd")
    assert ok.status == 200
    assert ok.header("Remote-User") == "alice" and ok.header("Remote-Groups") == "staff"
    assert ok.header("Remote-Email") == "alice@example.com"
    api = relay.login("bob", "Bob-Passw0rd")
    assert api.status == 200
    body = api.json()
    assert (body["outcome"], body["step"], body["identity"]["display_name"]) == ("success", "relay", "Bob B")
    wrong = relay.login("alice", "wrong-password")
    assert (wrong.json()["outcome"], wrong.json()["reason"]) == ("invalid_credentials", "ldap.invalid_password")
    assert relay.process.auth("alice", "wrong-password").status == 401
    unknown = relay.login("nobody", "whatever-1")
    assert (unknown.json()["outcome"], unknown.json()["reason"]) == ("user_not_found", "ldap.user_not_found")
    # each connector decided some of them with its own chain, audited as arriving over the link
    decided = [line for c in connectors for line in c.process.audit()]
    assert {line["front_door"] for line in decided} == {"link"}
    assert len(decided) - before == 5
    relay_audit = relay.process.audit()
    assert [a["outcome"] for a in relay_audit][-5:] == ["success", "success", "invalid_credentials",
                                                        "invalid_credentials", "user_not_found"]


def test_connectors_never_listen_for_the_link(site):
    _, connectors = site
    for connector in connectors:
        assert connector.listening_ports() == {connector.process.port}


def test_least_in_flight_spreads_logins_over_both_connectors(site):
    relay, connectors = site
    before = [len(c.process.audit()) for c in connectors]
    for _ in range(10):
        assert relay.login("alice", "Alice-Passw0rd").status == 200
    counts = [len(c.process.audit()) - b for c, b in zip(connectors, before)]
    assert sum(counts) == 10 and min(counts) >= 1


def test_no_connector_online_cached_users_from_the_cache_others_503(site):
    relay, connectors = site
    assert relay.login("alice", "Alice-Passw0rd").json()["from_cache"] is False
    for connector in connectors:
        connector.stop()
    cached = relay.login("alice", "Alice-Passw0rd")
    assert cached.status == 200 and cached.json()["from_cache"] is True
    assert relay.login("alice", "wrong-password").json()["outcome"] == "invalid_credentials"
    other = relay.login("carol", "Carol-Passw0rd")
    assert other.status == 503 and other.json()["reason"] == "relay.no_connector"
    assert relay.process.auth("carol", "Carol-Passw0rd").status == 503
    connectors[0].start().wait_linked(relay)
    live = relay.login("carol", "Carol-Passw0rd")
    assert live.status == 200 and live.json()["from_cache"] is False
    connectors[1].start().wait_linked(relay)
