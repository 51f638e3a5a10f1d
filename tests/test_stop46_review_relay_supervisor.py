"""Review of the relay's and the supervisor's last changes (stop 46): real relays (``authgw
serve``), a real redis-server and slapd, real connectors (tests/support/linkenv.py)."""

from __future__ import annotations

import pytest

from support.linkdir import slapd  # noqa: F401 - fixture
from support.linkenv import Connector, Relay
from support.net import wait_for
from support.redis import RedisServer


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_ca_key_of_another_redis_type_keeps_no_revocation_from_being_applied(tmp_path, slapd, redis):
    """The CA check of each maintenance round re-raised every Redis error as the registry's,
    and a value of another Redis type under the CA key (a hash: GET answers WRONGTYPE) is one:
    each round logged "the registry does not answer" and skipped the revocations, so a revoked
    connector kept its link and its logins; its enrolment was never refused either. The same
    value stopped `authgw relay revoke` itself. Now it is "not a relay CA", as an encrypted key
    is: said, overwritten never, and revocations apply."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)
        client = redis.client()
        client.delete("authgw:relay:ca")
        client.hset("authgw:relay:ca", mapping={"key": "x", "cert": "y"})
        wait_for(lambda: "Redis holds another relay CA (SHA-256 (not a relay CA))" in relay.process.output(), 15,
                 what="the value said", log=relay.process.output)
        revoke = relay.cli("relay", "revoke", connector.connector_id)
        assert revoke.returncode == 0, (revoke.stdout, revoke.stderr)
        wait_for(lambda: f"connector {connector.connector_id} revoked" in relay.process.output(), 15,
                 what="the revoked connector's link closed", log=relay.process.output)
        assert relay.login("alice", "Alice-Passw0rd").status != 200
        assert client.type("authgw:relay:ca") == b"hash"  # overwritten never
        assert "registry does not answer" not in relay.process.output()
    finally:
        connector.stop()
        relay.stop()


def test_one_record_of_another_redis_type_keeps_no_other_revocation_from_being_applied(tmp_path, slapd, redis):
    """The same for the registry read of each round (which the CA check now lets run): one
    connector's record of another Redis type failed the whole read (WRONGTYPE), every round, and
    no revocation of any connector was applied: a revoked connector kept its link. Now that
    record is no record (its own link is closed, as for a record lost) and the others' revocations
    apply."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    ticket = relay.ticket("--uses", "2")
    revoked = Connector(tmp_path / "c1", slapd).enroll(ticket, relay.ca_file).start()
    damaged = Connector(tmp_path / "c2", slapd).enroll(ticket, relay.ca_file).start()
    try:
        revoked.wait_linked(relay)
        damaged.wait_linked(relay)
        client = redis.client()
        client.delete(f"authgw:relay:connector:{damaged.connector_id}")
        client.set(f"authgw:relay:connector:{damaged.connector_id}", "not a record")
        revoke = relay.cli("relay", "revoke", revoked.connector_id)
        assert revoke.returncode == 0, (revoke.stdout, revoke.stderr)
        wait_for(lambda: f"connector {revoked.connector_id} revoked" in relay.process.output(), 15,
                 what="the revoked connector's link closed", log=relay.process.output)
        wait_for(lambda: f"connector {damaged.connector_id} is no longer in the registry" in relay.process.output(),
                 15, what="the damaged record's link closed", log=relay.process.output)
        assert relay.login("alice", "Alice-Passw0rd").status != 200
        assert "registry does not answer" not in relay.process.output()
    finally:
        revoked.stop()
        damaged.stop()
        relay.stop()
