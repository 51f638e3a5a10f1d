"""Relay side, items left by the last review: new links bounded in rate per connector id (and
requests before identification per client address), the registry's Redis evicting keys, and the
relay CA check of each maintenance round. Real relays (``authgw serve``), a real redis-server and
slapd; the hostile connectors are played by the tests with certificates the relay issued."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.plugins import linkproto as proto
from support.linkdir import slapd  # noqa: F401 - fixture
from support.linkenv import Connector, NoDirectory, Relay, link_tls
from support.net import wait_for
from support.redis import RedisServer


#: The documented bounds (docs/link-protocol.md, "Limits per connector id"): new links per
#: connector id, and requests before identification per client address (a burst, then a rate).
DIAL_BURST, DIAL_RATE = 20, 1.0
ANONYMOUS_BURST, ANONYMOUS_RATE = 60, 2.0


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _reads(redis, command: str = "hgetall") -> int:
    """How many times Redis ran *command* (``INFO commandstats``)."""
    return int(redis.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


# A client dialling /link as fast as it can, *parallel* loops for *seconds*: the WebSocket upgrade
# request, the status line read, the connection dropped. Its own process: its TLS handshakes do
# not take the test's interpreter. Prints the count of each status.
_FLOOD = r"""
import asyncio, collections, json, ssl, sys, time
port, ca, cert, key, seconds, parallel = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
REQ = (b"GET /link HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
counts = collections.Counter()
async def dial(end):
    while time.monotonic() < end:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", int(port), ssl=ctx), 10)
            w.write(REQ)
            line = await asyncio.wait_for(r.readline(), 10)
            counts[line.split(b" ")[1].decode() if line else "eof"] += 1
            w.transport.abort()
        except Exception as exc:
            counts[type(exc).__name__] += 1
            await asyncio.sleep(0.01)
async def main():
    end = time.monotonic() + float(seconds)
    await asyncio.gather(*(dial(end) for _ in range(int(parallel))))
asyncio.run(main())
print(json.dumps(counts))
"""


def test_a_connector_dialling_in_a_loop_is_bounded_in_rate_and_others_log_in(tmp_path, slapd, redis):
    """New links were bounded in number per connector id, not in rate: one connector (its
    certificate valid) dialling and dropping in a loop cost the relay a registry read, a
    WebSocket upgrade, a route look-up and two log lines per link (about 150 a second from one
    client here, 3,000 links in 20 s), while another connector's logins waited behind them.
    Now a connector id opens a burst of links, then one a second; beyond it ``/link`` is
    refused (429 ``too_many_dials``) before the registry is read, said at most once a minute.
    The other connector's logins all succeed meanwhile, and the flooding id links again once it
    stops."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    hostile = Connector(tmp_path / "evil", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    flood = None
    try:
        connector.wait_linked(relay)
        before = _reads(redis)
        started = time.monotonic()
        link = hostile.state / "link"
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, str(relay.port), str(relay.ca_file),
                                  str(link / "cert.pem"), str(link / "key.pem"), "6", "8"],
                                 stdout=subprocess.PIPE, text=True)
        wait_for(lambda: "too_many_dials" in relay.process.output() or "new link(s) of connector" in
                 relay.process.output() or flood.poll() is not None, 30, what="the flood to start")
        logins = []
        while flood.poll() is None:
            logins.append(relay.login("alice", "Alice-Passw0rd"))
        elapsed = time.monotonic() - started
        counts = json.loads(flood.communicate(timeout=60)[0])
        reads = _reads(redis) - before
        assert sum(counts.values()) > 3 * DIAL_BURST, counts  # a flood it was
        # links admitted, and registry reads (the connector's record, each): the burst and the rate
        allowed = DIAL_BURST + DIAL_RATE * elapsed + 2
        assert counts.get("101", 0) <= allowed, (counts, elapsed)
        assert reads <= allowed + len(logins), (reads, counts, elapsed)  # a login reads nothing here
        assert counts.get("429", 0) >= sum(counts.values()) - allowed, counts
        # the other connector's logins: none past its deadline, none refused
        past = [a.json().get("reason") for a in logins if a.status != 200]
        assert logins and not past, past
        output = relay.process.output()
        said = [line for line in output.splitlines() if "new link(s) of connector" in line]
        assert len(said) == 1 and "WARNING" in said[0] and hostile.connector_id in said[0], said
        assert "Traceback" not in output
        # the burst refills: the flooding id links again once it stops
        wait_for(lambda: _hello_answered(relay, hostile), 30, what="the flooding id to link again")
        assert connector.connector_id in relay.ready_links()
        assert connector.process.output().count("link up:") == 1
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        connector.stop()
        relay.stop()


def _hello_answered(relay, identity) -> bool:
    """Whether *relay* takes *identity*'s link and answers its hello."""
    import aiohttp

    async def dial():
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=link_tls(relay, identity))
            except (aiohttp.ClientError, ssl.SSLError, OSError):
                return False
            await ws.send_str(proto.request("hello", {"version": "test"}, now=time.time(), timeout=5)[1])
            msg = await ws.receive(timeout=10)
            await ws.close()
            return msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "answer"

    return asyncio.run(dial())


def _get(url: str, ca) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), context=ssl.create_default_context(cafile=str(ca)),
                                    timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_requests_before_identification_are_bounded_per_client_address(tmp_path):
    """Enrolment needs no credentials, and each ``GET /p/TOKEN`` of a well-formed token is a
    registry read: one client looked tokens up without bound. Now a client address makes a
    burst of such requests, then two a second (429 ``too_many_requests``, said once a minute);
    the registry is not read for a refused one."""
    relay = Relay(tmp_path / "relay", cache=False).setup().start()
    try:
        url = f"{relay.url}/p/{'A' * 43}"
        started = time.monotonic()
        statuses = [_get(url, relay.ca_file) for _ in range(ANONYMOUS_BURST + 40)]
        looked_up = ANONYMOUS_BURST + ANONYMOUS_RATE * (time.monotonic() - started) + 1
        assert statuses.count(404) <= looked_up and set(statuses) <= {404, 429}, statuses
        assert 429 in statuses, statuses
        said = [line for line in relay.process.output().splitlines() if "without a connector certificate" in line]
        assert len(said) == 1 and "WARNING" in said[0], said
    finally:
        relay.stop()


# -- the registry's Redis evicting keys ----------------------------------------------------------


def _csr(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()


def _post(url: str, ca, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _revoked(relay, connector_id: str) -> bool | None:
    """Whether `authgw relay connectors` lists *connector_id* revoked (None: not listed)."""
    listing = relay.cli("relay", "connectors").stdout
    lines = [line for line in listing.splitlines() if connector_id in line]
    return None if not lines else "revoked" in lines[0]


def test_a_revoked_id_whose_record_redis_lost_is_not_enrolled_again(tmp_path, redis):
    """A revoked connector's record evicted (``allkeys-*``) or lost left its id free: a
    reusable ticket's enrolment naming that id made a fresh record, not revoked, and the id's
    answers were vouched for again (``gateway_answerer_revoked`` said not revoked). Now an id
    the registry lists is never enrolled again, record or not."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    try:
        ticket = relay.ticket("--uses", "5")
        victim = Connector(tmp_path / "v", NoDirectory()).enroll(ticket, relay.ca_file)
        assert relay.cli("relay", "revoke", victim.connector_id).returncode == 0
        assert _revoked(relay, victim.connector_id) is True
        redis.client().delete(f"authgw:relay:connector:{victim.connector_id}")  # as an eviction does
        status, body = _post(ticket, relay.ca_file, _csr(victim.connector_id))
        assert (status, body.get("error")) == (400, "csr_wrong_name"), (status, body)
        assert not redis.client().exists(f"authgw:relay:connector:{victim.connector_id}")
        # the ticket was not burnt by it: a new id still enrols
        assert Connector(tmp_path / "w", NoDirectory()).enroll(ticket, relay.ca_file).connector_id
    finally:
        relay.stop()


def test_enrolment_is_refused_while_the_registrys_redis_evicts_and_links_go_on(tmp_path, slapd, redis):
    """The relay's store reported an evicting Redis (``/readyz``) but went on using it. What an
    eviction can turn into a fail-open is enrolment (a record evicted frees its id, tickets
    expire and go first under ``volatile-*``): it is refused (503 ``store_unavailable``) while
    the policy evicts, said at ERROR once; the links up, logins and revocations go on; it opens
    again when the policy is fixed."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url,
                  extra="health: {probe_interval: 1}\n").setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)
        ticket = relay.ticket()
        redis.client().config_set("maxmemory", "1gb")
        redis.client().config_set("maxmemory-policy", "allkeys-lru")

        def store_state():
            states = {c["name"]: c for c in relay.process.get("/readyz").json()["components"]}
            return states.get("relay.store")

        wait_for(lambda: store_state() and store_state()["ready"] is False, 20, what="relay.store not ready",
                 log=relay.process.output)
        assert "maxmemory-policy allkeys-lru" in store_state()["detail"]
        assert _get(ticket, relay.ca_file) == 503
        status, body = _post(ticket, relay.ca_file, _csr("acme-0a1b2c3d"))
        assert (status, body.get("error")) == (503, "store_unavailable"), (status, body)
        said = [line for line in relay.process.output().splitlines() if "enrolment is refused until" in line]
        assert len(said) == 1 and "ERROR" in said[0], said
        assert relay.login("alice", "Alice-Passw0rd").status == 200  # the link serves
        redis.client().config_set("maxmemory-policy", "noeviction")
        wait_for(lambda: store_state()["ready"], 20, what="relay.store ready again")
        assert _get(ticket, relay.ca_file) == 200  # the ticket was kept, and is usable now
        late = Connector(tmp_path / "c2", NoDirectory()).enroll(ticket, relay.ca_file)
        assert _hello_answered(relay, late)
    finally:
        connector.stop()
        relay.stop()


# -- the relay CA check of each maintenance round ------------------------------------------------


def test_a_ca_key_that_does_not_load_keeps_no_revocation_from_being_applied(tmp_path, slapd, redis):
    """A value under the CA key whose private key is encrypted raised TypeError from the CA
    check, every maintenance round, before the registry was read: the round logged "the
    registry does not answer" and a revoked connector kept its link and its logins. Now such a
    value is "not a relay CA" (``relay.ca`` not ready, overwritten never) and revocations apply."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)
        key = ec.generate_private_key(ec.SECP256R1())
        locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"secret")).decode()
        value = json.dumps({"key": locked, "cert": relay.ca_file.read_text()})
        redis.client().set("authgw:relay:ca", value)
        wait_for(lambda: "Redis holds another relay CA (SHA-256 (not a relay CA))" in relay.process.output(), 15,
                 what="the value said", log=relay.process.output)
        assert relay.cli("relay", "revoke", connector.connector_id).returncode == 0
        wait_for(lambda: f"connector {connector.connector_id} revoked" in relay.process.output(), 15,
                 what="the revoked connector's link closed", log=relay.process.output)
        assert relay.login("alice", "Alice-Passw0rd").status != 200
        assert redis.client().get("authgw:relay:ca").decode() == value  # overwritten never
        assert "registry does not answer" not in relay.process.output()
    finally:
        connector.stop()
        relay.stop()


def test_the_ca_in_redis_is_parsed_only_when_it_changes(tmp_path, redis, monkeypatch):
    """The maintenance round reads the relay CA in Redis every second, and parsed its key and
    certificate each time. Now the bytes are compared with the last ones read, and parsed only
    when they change; what it reports stays: a conflict said, the CA written back when lost."""
    from gateway.plugins.relay import RelayPlugin
    from gateway.plugins.relay.ca import RelayCA
    from gateway.registry import PluginContext
    from gateway.settings import GatewaySettings

    settings = RelayPlugin.Settings.model_validate({
        "connection": "acme", "listen": "127.0.0.1:1", "public_url": "https://127.0.0.1:1",
        "redis": {"url": redis.url}})
    context = PluginContext(name="relay", config_dir=tmp_path, state_dir=tmp_path / "state",
                            gateway=GatewaySettings.model_validate({"chain": ["relay"]}), hook=None, log=logging.getLogger("test"))
    (tmp_path / "state").mkdir(mode=0o700)
    plugin = RelayPlugin(settings, context)
    parsed = []
    real = RelayCA.from_pem.__func__

    def counting(cls, key_pem, cert_pem):
        parsed.append(cert_pem)
        return real(cls, key_pem, cert_pem)

    monkeypatch.setattr(RelayCA, "from_pem", classmethod(counting))
    try:
        for _ in range(20):
            plugin._check_ca()
        assert len(parsed) <= 1 and plugin.ca_conflict == "", parsed
        other = RelayCA.load_or_create(tmp_path / "other", "other")
        redis.client().set("authgw:relay:ca", json.dumps({"key": other.key_pem.decode(), "cert": other.pem}))
        for _ in range(5):
            plugin._check_ca()
        assert other.fingerprint in plugin.ca_conflict and len(parsed) <= 2, parsed
        redis.client().delete("authgw:relay:ca")
        plugin._check_ca()  # written back: its own again
        assert plugin.ca_conflict == "" and json.loads(redis.client().get("authgw:relay:ca"))["cert"] == plugin.ca.pem
    finally:
        plugin.gateway_shutdown()


def test_a_ticket_hash_left_without_its_fields_is_unknown_not_a_server_error(tmp_path, redis):
    """A ticket evicted between an enrolment's read and its HINCRBY leaves a hash of ``uses``
    alone (no expiry: it stays); each request for that token then raised KeyError, a 500. Now
    such a hash is an unknown ticket (404)."""
    import hashlib
    import secrets

    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    try:
        token = secrets.token_urlsafe(32)
        redis.client().hset(f"authgw:relay:ticket:{hashlib.sha256(token.encode()).hexdigest()}", "uses", -1)
        assert _get(f"{relay.url}/p/{token}", relay.ca_file) == 404
        status, body = _post(f"{relay.url}/p/{token}", relay.ca_file, _csr("acme-0a1b2c3d"))
        assert (status, body.get("error")) == (404, "ticket_unknown"), (status, body)
        assert "Traceback" not in relay.process.output()
    finally:
        relay.stop()


def test_a_malformed_forwarded_request_in_the_inbox_is_answered_not_a_dead_task(tmp_path, slapd, redis):
    """An item of an instance's inbox with an id but not its other fields (only a Redis writer
    puts one there) killed its task with a traceback ("Task exception was never retrieved") and
    left its forwarder waiting until its deadline. Now it is answered ``relay.not_sent`` at
    once (nothing was sent on a link), with a warning."""
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)  # a link held here: the item is looked at
        client = redis.client()
        wait_for(lambda: client.keys("authgw:relay:instance:*"), 15, what="the instance's heartbeat")
        instance = client.keys("authgw:relay:instance:*")[0].decode().rsplit(":", 1)[1]
        client.rpush(f"authgw:relay:inbox:{instance}", json.dumps({"id": "malformed-1"}))
        reply = wait_for(lambda: client.lpop("authgw:relay:reply:malformed-1"), 15, what="a reply",
                         log=relay.process.output)
        assert json.loads(reply) == {"unreachable": "relay.not_sent"}, reply
        output = relay.process.output()
        assert "dropped a malformed forwarded request" in output and "Traceback" not in output
        assert relay.login("alice", "Alice-Passw0rd").status == 200
    finally:
        connector.stop()
        relay.stop()
