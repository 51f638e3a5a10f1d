"""Issue 13, step 5: two relay instances sharing a real redis-server. Tickets, the connector
registry, revocations and the relay CA live in Redis; a login arriving at the instance that does
not hold the connector's link is routed to the one that does."""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest

from support.linkenv import Connector, Relay, relays_sharing_redis
from support.net import wait_for
from support.proc import children
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
    with relays_sharing_redis(tmp_path) as shared:
        yield shared


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
            # b's audit names the connector a's link reached, as a's own does
            assert relay.process.audit_for(response.json()["request_id"])["answered_by"] == connector.connector_id
        wrong = b.login("alice", "not-Her-passw0rd")
        assert (wrong.json()["outcome"], wrong.json()["reason"]) == ("invalid_credentials", "ldap.invalid_password")
        assert b.process.audit_for(wrong.json()["request_id"])["answered_by"] == connector.connector_id
        assert b"Alice-Passw0rd" not in b"".join(redis.client().dump(k) or b"" for k in redis.client().keys("*"))
        # revoked through b's command line: a cuts the link it holds
        assert b.cli("relay", "revoke", connector.connector_id).returncode == 0
        wait_for(lambda: connector.connector_id not in a.ready_links(), 10, what="the revoked link to drop")
        assert b.login("alice", "Alice-Passw0rd").status == 503
    finally:
        connector.stop()


# -- issue 10 item 4: the relay's Redis store is probed -----------------------------------------------


def _components(relay: Relay) -> dict[str, dict]:
    return {c["name"]: c for c in relay.process.get("/readyz").json()["components"]}


def _get(url: str, ca, certificate: tuple[str, str] | None = None) -> tuple[int, dict]:
    """GET on the relay's TLS listener (with a connector's certificate and key when given)."""
    context = ssl.create_default_context(cafile=str(ca))
    if certificate is not None:
        context.load_cert_chain(*certificate)
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_relay_store_on_redis_is_probed_and_a_stop_leaves_the_local_links_serving(tmp_path, slapd):
    """Redis down: ``relay.store`` down with a WARNING line, ``/readyz`` still true with ``relay``
    degraded (the link this process holds still serves logins) while enrolment and new links
    are refused with 503 (the registry and its revocations cannot be read: fail closed); back
    without a login; and a ready store alone never makes the step ready (no link: not ready)."""
    password = "Redis-" + secrets.token_hex(12)
    redis = RedisServer(tmp_path / "redis", password=password).start()
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url, env={"RELAY_REDIS_PASSWORD": password},
                  extra="health: {probe_interval: 1}\n")
    conf = relay.conf / "relay.yaml"
    settings = json.loads(conf.read_text().removeprefix("relay: "))
    settings["redis"]["password"] = {"env": "RELAY_REDIS_PASSWORD"}
    conf.write_text("relay: " + json.dumps(settings) + "\n")
    connector = None
    try:
        relay.setup().start()
        connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
        connector.wait_linked(relay)
        ticket = relay.ticket()
        own = connector.state / "link"
        certificate = (str(own / "cert.pem"), str(own / "key.pem"))
        assert _get(ticket, relay.ca_file)[0] == 200
        where = f"redis://127.0.0.1:{redis.port}"
        store = _components(relay)["relay.store"]
        assert (store["ready"], store["detail"]) == (True, f"{where}: answers")

        redis.client().save()  # a Redis with persistence: back with its data (one without: the next test)
        redis.stop()
        store = wait_for(lambda: (c := _components(relay)["relay.store"])["ready"] is False and c,
                         what="relay.store to be seen down", log=relay.process.output)
        assert store["detail"].startswith(f"{where}: ")
        readyz = relay.process.get("/readyz")
        assert (readyz.status, readyz.json()["ready"], readyz.json()["degraded"]) == (200, True, ["relay"])
        assert relay.login("alice", "Alice-Passw0rd").status == 200  # the local link needs no Redis
        refused = (503, {"error": "store_unavailable",
                         "detail": "the relay cannot read its registry now; try again later"})
        assert _get(ticket, relay.ca_file) == refused
        assert _get(f"{relay.url}/link", relay.ca_file, certificate) == refused
        lines = wait_for(lambda: [line for line in relay.process.output().splitlines()
                                  if "health: " in line and "relay.store is NOT ready" in line])
        assert "WARNING" in lines[0] and where in lines[0]
        # The relay's own loops say it once per outage, not every second (two more rounds here).
        wait_for(lambda: "the registry does not answer" in relay.process.output(), log=relay.process.output)
        time.sleep(2.5)
        output = relay.process.output()
        assert output.count("relay maintenance: the registry does not answer") == 1
        assert output.count("relay routing: Redis unavailable") == 1
        assert "relay maintenance failed" not in output

        redis.start()
        wait_for(lambda: _components(relay)["relay.store"]["ready"], what="relay.store to recover",
                 log=relay.process.output)
        readyz = relay.process.get("/readyz").json()
        assert readyz["ready"] is True and "degraded" not in readyz
        # The health thread logs just after it decides: wait for the line rather than race it.
        wait_for(lambda: all(line in relay.process.output() for line in (
            "relay.store is ready again", "relay maintenance: the registry answers again",
            "relay routing: Redis answers again")), log=relay.process.output)
        assert password not in relay.process.output() and password not in relay.process.get("/readyz").text

        connector.stop()  # the store answers, but no connector: the step cannot answer
        wait_for(lambda: relay.process.get("/readyz").status == 503, what="/readyz to turn false")
        readyz = relay.process.get("/readyz").json()
        assert readyz["reason"] == "no ready backend: relay"
        assert _components(relay)["relay.store"]["ready"] is True
    finally:
        if connector is not None:
            connector.stop()
        relay.stop()
        redis.stop()


def test_a_renewal_while_the_relay_store_is_down_keeps_the_link_and_is_asked_again(tmp_path, slapd):
    """The registry cannot be read (whether the connector was revoked since) nor the renewal
    recorded: the connector gets an ``unavailable`` answer (not a dropped link), keeps its
    certificate and link, and renews once Redis is back."""
    lifetime = 40.0  # renewal at two thirds: room for a slow start before Redis is stopped
    # One link all along, for half a minute: pings 5 s apart at both ends (a pong may take half
    # as long). With the fixtures' 1 s, a pong 0.5 s late on a loaded machine (two suites on two
    # cores) ended the link once, and no new one is let in while the registry is down.
    redis = RedisServer(tmp_path / "redis").start()
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url, certificate_lifetime=lifetime,
                  settings={"ping_interval": 5.0})
    connector = None
    try:
        relay.setup().start()
        connector = Connector(tmp_path / "c1", slapd, link={"backoff_max": 1.0, "ping_interval": 5.0})
        connector.enroll(relay.ticket(), relay.ca_file).start().wait_linked(relay)
        redis.client().save()  # a Redis with persistence: back with its registry
        redis.stop()
        wait_for(lambda: "certificate renewal failed" in connector.process.output(), lifetime,
                 what="the renewal to be refused", log=connector.process.output)
        assert "the relay cannot read its registry now" in connector.process.output()
        assert connector.connector_id in relay.ready_links()
        assert relay.login("alice", "Alice-Passw0rd").status == 200
        redis.start()
        wait_for(lambda: "certificate renewed over the link" in connector.process.output(), 20,
                 what="the renewal once Redis is back", log=connector.process.output)
        assert connector.process.output().count("link up:") == 1  # one link all along
        assert connector.connector_id in relay.ready_links()
    finally:
        if connector is not None:
            connector.stop()
        relay.stop()
        redis.stop()


def test_redis_lost_while_a_login_is_forwarded_answers_unavailable(tmp_path, slapd, relays):
    """b forwards a login to a (which holds the link) and waits for the answer in Redis; Redis
    goes away meanwhile: the login is unavailable (503, retry later), not an error of the step."""
    (a, b), redis = relays
    connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file).start()
    frozen: list[int] = []
    try:
        connector.wait_linked(a)
        assert b.login("alice", "Alice-Passw0rd").status == 200  # routed through Redis to a's link
        # a stops answering (frozen, by PID, with its workers): b's forward waits in BLPOP
        frozen = [a.process.proc.pid, *children(a.process.proc.pid)]
        for p in frozen:
            os.kill(p, signal.SIGSTOP)
        watch = redis.client()

        def pushes() -> int:  # RPUSH calls so far: b hands a forwarded request to a's inbox with one
            return watch.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0)

        before = pushes()
        answers = []
        login = threading.Thread(target=lambda: answers.append(b.login("alice", "Alice-Passw0rd")))
        login.start()
        wait_for(lambda: pushes() > before or answers, 10, what="b to hand the login to a")
        assert not answers, f"b answered before forwarding: {answers[0].text}"
        redis.stop()
        login.join(30)
        assert answers, "the forwarded login got no answer"
        response = answers[0]
        assert response.status == 503, response.text
        assert (response.json()["outcome"], response.json()["reason"]) == ("unavailable", "relay.no_connector")
        assert "Alice-Passw0rd" not in b.process.output()
    finally:
        for p in frozen:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        connector.stop()


def test_a_hello_while_the_relay_store_is_down_is_refused_as_unavailable(tmp_path, slapd):
    """The link is authenticated against the registry when it opens; Redis gone before its hello:
    the hello cannot be recorded (nor routed), so it is refused, ``unavailable``, and the
    connector dials again later; never an unhandled error in the link's handler."""
    import asyncio

    import aiohttp

    from gateway.plugins import linkproto as proto

    redis = RedisServer(tmp_path / "redis").start()
    relay = Relay(tmp_path / "relay", cache=False, redis_url=redis.url)
    try:
        relay.setup().start()
        identity = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
        context = ssl.create_default_context(cafile=str(relay.ca_file))
        context.load_cert_chain(str(identity.state / "link" / "cert.pem"), str(identity.state / "link" / "key.pem"))

        async def hello_after_redis_stops() -> dict:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=context) as ws:
                    redis.stop()
                    await ws.send_str(proto.request("hello", {"version": "test"}, now=time.time(), timeout=10)[1])
                    return json.loads((await ws.receive(timeout=15)).data)

        answer = asyncio.run(hello_after_redis_stops())
        assert (answer["type"], answer["body"]["code"]) == ("error", "unavailable"), answer
        assert identity.connector_id not in relay.ready_links()
        output = relay.process.output()
        assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
    finally:
        relay.stop()
        redis.stop()


def test_a_connector_whose_record_redis_lost_is_cut_off_and_vouches_no_more(tmp_path, slapd):
    """A Redis that lost its data (restarted without persistence, flushed) forgot the connector:
    ``relay revoke`` could no longer name it, and its link stayed up, answering logins, with the
    relay's cache repeating its word. Now a linked connector missing from the registry is cut
    off as a revoked one is, and nothing is answered on its word: it must enrol again."""
    redis = RedisServer(tmp_path / "redis").start()
    relay = Relay(tmp_path / "relay", redis_url=redis.url)
    connector = None
    try:
        relay.setup().start()
        connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
        connector.wait_linked(relay)
        me = connector.connector_id
        time.sleep(1.5)  # a maintenance round that reads the record: the link is not cut for being new
        assert me in relay.ready_links()
        answer = relay.login("alice", "Alice-Passw0rd").json()
        assert (answer["outcome"], answer["from_cache"]) == ("success", False)
        assert f"vouched for by {me}" in relay.cli("cache", "show", "alice").stdout

        redis.client().flushall()
        wait_for(lambda: me not in relay.ready_links(), 10, what="the forgotten connector's link to be cut",
                 log=relay.process.output)
        assert f"connector {me} is no longer in the registry" in relay.process.output()
        refused = relay.login("alice", "Alice-Passw0rd")
        assert refused.status == 503 and refused.json()["from_cache"] is False, refused.text
        assert relay.cli("cache", "show", "alice").stdout.startswith("no entry for alice")
        time.sleep(2.5)  # it dials again, and is refused: no record, no link
        assert me not in relay.ready_links()
        assert relay.login("alice", "Alice-Passw0rd").status == 503
    finally:
        if connector is not None:
            connector.stop()
        relay.stop()
        redis.stop()
