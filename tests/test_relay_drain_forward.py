"""Which link a request may take, whichever relay instance it reached (review of the relay):

* a login reaching another instance through Redis was sent to any ready link of the holder,
  a draining one (its connector stopping: "a planned restart fails no login") or one at
  ``max_in_flight`` included, unlike a login reaching the holder itself;
* a forwarded request that waited in the holder's inbox past its deadline was still sent: a
  password checked after the user was answered, counting towards the directory's lockout;
* a write the connector does not read was not bounded: the request, and its ``in_flight``, stayed;
* every link at ``max_in_flight`` read as "no connector", so the relay's cache answered during a
  flood, for users the directory may have disabled since (``relay.busy`` now, no offline answer).

The connectors here are real ``authgw serve`` processes, or a link spoken by hand (:class:`RawLink`,
with a real enrolment) where the test must hold requests unanswered or count the frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import ssl
import threading
import time

import aiohttp
import pytest

from gateway.plugins import linkproto as proto
from gateway.plugins.relay.hub import Hub, LinkSession, Unreachable
from support.linkenv import Connector, NoDirectory, Relay, relays_sharing_redis
from support.net import wait_for
from support.slapd import Slapd

_PREFIX = "authgw:relay:"  # relay.redis.key_prefix's default


class RawLink:
    """A connector's link spoken by hand, with the enrolment *connector* made (``authgw link
    enroll``), on an event loop of its own thread. It counts the ``authenticate`` frames it gets
    and answers the n-th (from 1) with ``answer(n)``; ``None`` leaves it unanswered, in flight."""

    def __init__(self, relay: Relay, connector: Connector, answer=lambda n: None) -> None:
        self.url = f"wss://127.0.0.1:{relay.port}/link"
        self.context = ssl.create_default_context(cafile=str(relay.ca_file))
        link = connector.state / "link"
        self.context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
        self.connector_id = connector.connector_id
        self.answer = answer
        self.authenticate = 0
        self._answers: dict[str, asyncio.Future] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.http = self.ws = self.reader = None

    def _run(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self) -> RawLink:
        self._run(self._open())
        return self

    async def _open(self) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.url, ssl=self.context)
        self.reader = asyncio.ensure_future(self._read())
        await self._ask("hello", {"version": "raw", "time": time.time()})

    async def _ask(self, type_: str, body: dict) -> dict:
        request_id, frame = proto.request(type_, body, now=time.time(), timeout=5)
        future = self._answers[request_id] = self.loop.create_future()
        await self.ws.send_str(frame)
        message = await asyncio.wait_for(future, 10)
        assert message["type"] == "answer", message
        return message["body"]

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "authenticate":
                self.authenticate += 1
                body = self.answer(self.authenticate)
                if body is not None:
                    await self.ws.send_str(proto.answer(frame["id"], body))
            elif frame["id"] in self._answers:
                self._answers.pop(frame["id"]).set_result(frame)

    def drain(self) -> dict:
        return self._run(self._ask("drain", {}))

    def close(self) -> None:
        async def close() -> None:
            self.reader.cancel()
            await self.ws.close()
            await self.http.close()

        try:
            if self.ws is not None:
                self._run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def _refused(n: int) -> dict:
    return {"outcome": "invalid_credentials", "reason": "raw.refused", "step": "raw", "from_cache": False,
            "identity": None}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A")
    yield server
    server.stop()


@pytest.fixture
def relays(tmp_path):
    with relays_sharing_redis(tmp_path) as shared:
        yield shared


def test_a_draining_link_gets_no_login_forwarded_from_another_instance(tmp_path, slapd, relays):
    (a, b), _ = relays
    serving = Connector(tmp_path / "serving", slapd).enroll(a.ticket(), a.ca_file).start()
    stopping = Connector(tmp_path / "stopping", NoDirectory()).enroll(a.ticket(), a.ca_file)
    raw = RawLink(a, stopping)
    try:
        serving.wait_linked(a)
        raw.open()
        wait_for(lambda: stopping.connector_id in a.ready_links(), 10, what="the raw link to be ready")
        raw.drain()  # what a connector stopping cleanly (SIGTERM) sends first
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            # At b, which holds no link: every login goes through Redis to a's links.
            answers = list(pool.map(lambda n: b.login("alice", "Alice-Passw0rd"), range(30)))
        assert [r.status for r in answers] == [200] * 30, {r.json().get("reason") for r in answers}
        assert a.login("alice", "Alice-Passw0rd").status == 200  # at the holder itself, as before
        assert raw.authenticate == 0

        serving.stop()  # the draining link is all that is left: refused cleanly, nothing sent
        wait_for(lambda: serving.connector_id not in a.ready_links(), 10, what="the serving link to close")
        refused = b.login("alice", "Alice-Passw0rd")
        assert (refused.status, refused.json()["reason"]) == (503, "relay.no_connector")
        assert raw.authenticate == 0
    finally:
        raw.close()
        serving.stop()


def test_a_forwarded_request_past_its_deadline_is_not_sent(tmp_path, relays):
    (a, _), redis = relays
    holder = Connector(tmp_path / "holder", NoDirectory()).enroll(a.ticket(), a.ca_file)
    raw = RawLink(a, holder, answer=_refused).open()
    try:
        client = redis.client(decode_responses=True)
        instance = wait_for(lambda: client.hget(f"{_PREFIX}route:acme", holder.connector_id), 10,
                            what="the link's route in Redis")
        body = {"username": "alice", "password": "sealed-elsewhere", "client": "192.0.2.1", "request_id": "r1",
                "front_door": "api"}

        def forward(stamp: proto.Stamp) -> dict:
            # As router.Router._forward pushes it (another instance's forwarder).
            client.rpush(f"{_PREFIX}inbox:{instance}", json.dumps(
                {"id": stamp.id, "nonce": stamp.nonce, "deadline": stamp.deadline, "connector": holder.connector_id,
                 "type": "authenticate", "body": body, "timeout": 5.0}))
            item = client.blpop([f"{_PREFIX}reply:{stamp.id}"], timeout=10)
            assert item is not None, "no reply from the holding instance"
            return json.loads(item[1])

        # Waited in the inbox past its deadline (a busy holder, a Redis pause): the user was
        # answered already, so the password is not checked now.
        late = forward(proto.new_stamp(now=time.time() - 10, timeout=5))
        assert late == {"unreachable": "relay.timeout"}
        assert raw.authenticate == 0
        on_time = forward(proto.new_stamp(now=time.time(), timeout=5))
        assert on_time["message"]["body"]["reason"] == "raw.refused"
        assert raw.authenticate == 1
        assert re.search(r"arrived [0-9.]+ s past its deadline; not sent", a.process.output())
    finally:
        raw.close()


def _relay_with(tmp_path, **settings) -> Relay:
    relay = Relay(tmp_path / "relay")  # with the cache (methods: [relay])
    conf = relay.conf / "relay.yaml"
    conf.write_text("relay: " + json.dumps({**json.loads(conf.read_text().removeprefix("relay: ")), **settings})
                    + "\n")
    return relay


def test_every_link_busy_is_relay_busy_and_the_relays_cache_does_not_answer(tmp_path):
    alice = {"subject": "uid=alice", "username": "alice", "display_name": "Alice A", "email": "", "groups": [],
             "claims": {}, "method": "ldap", "authenticated_at": time.time()}
    # The first login succeeds (the relay's cache learns alice), the next ones are held unanswered.
    first = {"outcome": "success", "reason": "", "step": "ldap", "from_cache": False, "identity": alice}
    relay = _relay_with(tmp_path, max_in_flight=1).setup().start()
    connector = Connector(tmp_path / "c", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    raw = RawLink(relay, connector, answer=lambda n: first if n == 1 else None).open()
    held = None
    try:
        wait_for(lambda: connector.connector_id in relay.ready_links(), 10, what="the raw link to be ready")
        live = relay.login("alice", "Alice-Passw0rd")
        assert (live.status, live.json()["from_cache"]) == (200, False)
        held = concurrent.futures.ThreadPoolExecutor(1).submit(relay.login, "alice", "Alice-Passw0rd")
        wait_for(lambda: raw.authenticate == 2, 5, what="a login in flight on the only link")
        busy = relay.login("alice", "Alice-Passw0rd")  # the link carries its max_in_flight
        assert (busy.status, busy.json()["reason"], busy.json()["from_cache"]) == (503, "relay.busy", False)
        assert raw.authenticate == 2
    finally:
        if held is not None:
            held.result(15)
        raw.close()
        relay.stop()


# -- the hub alone, with links whose WebSocket is a stand-in --------------------------------------------


class _Socket:
    """A WebSocket whose ``send_str`` waits as a connector that stopped reading makes it wait."""

    closed = False

    def __init__(self, stalls: bool = False) -> None:
        self.stalls = stalls
        self.sent: list[str] = []

    async def send_str(self, frame: str) -> None:
        if self.stalls:
            await asyncio.Event().wait()
        self.sent.append(frame)


def _link(connector: str, socket: _Socket | None = None, *, in_flight: int = 0, draining: bool = False) -> LinkSession:
    session = LinkSession(socket or _Socket(), connector, "acme", None, time.time() + 3600)
    session.ready, session.in_flight, session.draining = True, in_flight, draining
    return session


def _call(hub: Hub, timeout: float = 0.5) -> Unreachable:
    async def call() -> None:
        # The outer bound only catches a call that never ends (a TimeoutError, not Unreachable).
        await asyncio.wait_for(hub.call("acme", "lookup_user", {"username": "alice"}, timeout, retry=True), 60)

    with pytest.raises(Unreachable) as raised:
        asyncio.run(call())
    return raised.value


def test_links_all_at_max_in_flight_are_busy_not_offline():
    hub = Hub(max_in_flight=2)
    for name in ("c1", "c2"):
        hub.add(_link(name, in_flight=2))
    busy = _call(hub)
    assert (busy.reason, busy.offline) == ("relay.busy", False)
    assert all(not s.ws.sent for s in hub.all())


def test_draining_links_are_no_connector_and_get_nothing():
    hub = Hub(max_in_flight=2)
    hub.add(_link("c1", draining=True))
    none = _call(hub)
    assert (none.reason, none.offline) == ("relay.no_connector", True)
    assert not hub.all()[0].ws.sent


def test_a_send_the_connector_does_not_read_ends_with_the_calls_deadline():
    hub = Hub(max_in_flight=2)
    hub.add(_link("c1", _Socket(stalls=True)))
    stalled = _call(hub, timeout=0.3)  # before: the write waited for ever (the outer bound's TimeoutError)
    assert stalled.reason == "relay.timeout"
    assert hub.all()[0].in_flight == 0 and not hub.all()[0].pending
