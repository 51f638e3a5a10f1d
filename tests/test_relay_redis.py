"""Issue 13, step 5: two relay instances sharing a real redis-server. Tickets, the connector
registry, revocations and the relay CA live in Redis; a login arriving at the instance that does
not hold the connector's link is routed to the one that does."""

from __future__ import annotations


import pytest

from support.linkenv import Connector, Relay
from support.net import wait_for
from support.redis import RedisServer
from support.slapd import Slapd


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", groups=["staff"])
    yield server
    server.stop()


@pytest.fixture
def relays(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    started = []
    try:
        for name in ("a", "b"):
            started.append(Relay(tmp_path / f"relay-{name}", cache=False, redis_url=redis.url).setup().start())
        yield started, redis
    finally:
        for relay in started:
            relay.stop()
        redis.stop()


def test_a_login_at_the_other_instance_is_routed_to_the_link(tmp_path, slapd, relays):
    (a, b), redis = relays
    assert a.ca_file.read_bytes() == b.ca_file.read_bytes()  # one relay CA, shared through Redis
    assert a.cli("relay", "connection", "list").stdout.split() == ["acme"]
    ticket = b.ticket()  # made at b, used at a: tickets live in Redis
    at_a = ticket.replace(b.url, a.url)
    connector = Connector(tmp_path / "c1", slapd).enroll(at_a, b.ca_file).start()
    try:
        connector.wait_linked(a)
        assert b.ready_links() == ""  # b holds no link itself
        for relay in (a, b, b):
            response = relay.login("alice", "Alice-Passw0rd")
            assert response.status == 200, response.text
            assert response.json()["identity"]["groups"] == ["staff"]
        wrong = b.login("alice", "not-Her-passw0rd")
        assert (wrong.json()["outcome"], wrong.json()["reason"]) == ("invalid_credentials", "ldap.invalid_password")
        assert b"Alice-Passw0rd" not in b"".join(redis.client().dump(k) or b"" for k in redis.client().keys("*"))
        # revoked through b's command line: a cuts the link it holds
        assert b.cli("relay", "revoke", connector.connector_id).returncode == 0
        wait_for(lambda: connector.connector_id not in a.ready_links(), 10, what="the revoked link to drop")
        assert b.login("alice", "Alice-Passw0rd").status == 503
    finally:
        connector.stop()
