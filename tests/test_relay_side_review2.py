"""Second review of the relay side of the link: what Redis forgets while links are up, what the
relay's command line takes, and the relay CA's key on disk. Real relays (``authgw serve``), a
real redis-server, slapd and connectors."""

from __future__ import annotations

import pytest

from support.linkenv import Connector, Relay, relays_sharing_redis
from support.net import wait_for
from support.slapd import Slapd


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", groups=["staff"])
    yield server
    server.stop()


def test_a_route_redis_lost_is_written_again_by_the_instance_holding_the_link(tmp_path, slapd):
    """A route (connector -> instance) was written once, at the link's hello. Redis restarted from
    a snapshot taken before the link came up (or failed over, or evicted the key): the route was
    gone, the registry and the CA were not, and every login at the other instance was 503
    ``relay.no_connector`` while the connector stayed linked, until it happened to dial again.
    Now the holding instance writes it again within a maintenance round."""
    with relays_sharing_redis(tmp_path) as ((a, b), redis):
        connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file)
        redis.client().save()  # the registry, the CA, the connector's record: no route yet
        connector.start()
        try:
            connector.wait_linked(a)
            assert b.login("alice", "Alice-Passw0rd").status == 200  # forwarded to a's link
            route = "authgw:relay:route:acme"
            assert redis.client().hgetall(route), "a wrote the route at the hello"
            redis.stop()
            redis.start()  # back from the snapshot: everything but the route
            assert not redis.client().hgetall(route)
            assert redis.client().exists(f"authgw:relay:connector:{connector.connector_id}")
            wait_for(lambda: redis.client().hgetall(route), 15, what="a to write its route again",
                     log=a.process.output)
            assert connector.connector_id in a.ready_links()
            answer = b.login("alice", "Alice-Passw0rd")
            assert answer.status == 200, answer.text
            assert answer.json()["identity"]["groups"] == ["staff"]
            assert b.process.audit_for(answer.json()["request_id"])["answered_by"] == connector.connector_id
            assert "was missing in Redis" in a.process.output()
            assert connector.process.output().count("link up:") == 1  # the same link all along
        finally:
            connector.stop()


def test_a_route_is_not_written_again_for_a_link_that_closed(tmp_path, slapd):
    """What is written again is the routes of links held here: a connector stopped leaves none
    behind (a stale route costs every forward a round trip to an instance without its link)."""
    with relays_sharing_redis(tmp_path) as ((a, b), redis):
        connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file).start()
        try:
            connector.wait_linked(a)
        finally:
            connector.stop()
        route = "authgw:relay:route:acme"
        wait_for(lambda: not redis.client().hgetall(route), 15, what="the route to go with the link")
        wait_for(lambda: "link closed" in a.process.output(), 15, what="a to see the link close")
        for _ in range(3):  # maintenance rounds (a second each) write no route for it
            assert a.login("alice", "Alice-Passw0rd").status == 503
        assert not redis.client().hgetall(route)


@pytest.mark.parametrize("uses", ["100000000000000000000000", "0", "-5", "x"])
def test_a_ticket_count_out_of_range_is_refused_before_anything_is_stored(tmp_path, uses):
    """``--uses`` beyond 64 bits was a traceback from SQLite (``OverflowError``) after the
    connection was checked; in Redis it made a ticket whose count ``HINCRBY`` cannot lower (each
    enrolment a 503). Refused as argparse refuses, with nothing stored."""
    relay = Relay(tmp_path / "relay", cache=False).setup()
    result = relay.cli("relay", "ticket", "acme", "--uses", uses)
    assert result.returncode != 0 and "Traceback" not in result.stderr, (result.returncode, result.stderr[-2000:])
    assert "--uses" in result.stderr and "/p/" not in result.stdout
    assert relay.cli("relay", "ticket", "acme", "--uses", "100000").returncode == 0


def test_a_relay_ca_key_others_can_read_is_said(tmp_path):
    """Whoever reads ``ca.key`` issues certificates the connectors trust for the relay: it can
    stand in for the relay towards them and be sent their requests. A key restored or copied as
    0644 was used without a word (the connector's own key is said). Said at every start and by
    every ``authgw relay`` command; a 0600 key is not."""
    relay = Relay(tmp_path / "relay", cache=False).setup()
    key = relay.state / "relay" / "ca" / "ca.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "open to group or others" not in relay.cli("relay", "connectors").stderr
    key.chmod(0o644)
    listing = relay.cli("relay", "connectors")
    assert listing.returncode == 0
    assert f"private key {key} is open to group or others (mode 644); chmod 600 {key}" in listing.stderr, \
        listing.stderr
    relay.start()
    try:
        wait_for(lambda: "open to group or others" in relay.process.output(), 30, what="serve to say it",
                 log=relay.process.output)
        said = [line for line in relay.process.output().splitlines() if "open to group or others" in line]
        assert "WARNING" in said[0], said
    finally:
        relay.stop()
