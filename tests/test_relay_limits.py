"""What one connector identity (enrolled, or a stolen key) can make a relay hold is bounded per
identity, not per link: at most MAX_LINKS open links, MAX_PROBES of them probes, one replay
record shared by its links and sized from the request rate the relay accepts, and a link that
says no hello is closed. Before, each link had its own 200,000-entry replay record, probe links
were never limited and silent links were kept: ~40 MB of relay memory per link, any number of
links (review finding 3)."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import ssl
import time

import aiohttp
import pytest

from gateway.plugins import linkproto as proto
from gateway.plugins.relay import hub as relay_hub
from support.linkenv import Connector, NoDirectory, Relay
from support.net import wait_for

MAX_LINKS, MAX_PROBES = 8, 4  # the documented limits (docs/link-protocol.md, "Limits per connector")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    # The tests' links are raw aiohttp clients, which answer the relay's pings only while they
    # read: with the fixture's 1 s pings, a link held unread for a moment on a loaded machine
    # was cut by the heartbeat before the close a test waits for. Limits, not heartbeats, here.
    server = Relay(tmp_path_factory.mktemp("relay"), settings={"ping_interval": 30.0}).setup().start()
    yield server
    server.stop()


def _identity(relay, tmp_path):
    """A fresh enrolled connector identity (its state directory; the test plays that connector)."""
    return Connector(tmp_path / secrets.token_hex(4), NoDirectory()).enroll(relay.ticket(), relay.ca_file)


def _context(relay, identity) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    link = identity.state / "link"
    context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
    return context


def _hello(probe: bool, **stamp) -> str:
    body = {"version": "test", **({"probe": True} if probe else {})}
    return proto.request("hello", body, now=time.time(), timeout=5, **stamp)[1]


def _state(relay, identity) -> dict:
    """The relay's own account of what *identity* holds there (GET /v1/relay/connectors)."""
    answer = relay.process.get("/v1/relay/connectors", {"Authorization": f"Bearer {relay.token}"}).json()
    held = [c for c in answer.get("connectors", []) if c["connector"] == identity.connector_id]
    links = [link for link in answer["links"] if link["connector"] == identity.connector_id]
    return {"links": len(links), "probes": sum(1 for link in links if link.get("probe")),
            **(held[0] if held else {})}


async def _answer(ws) -> dict:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    return json.loads(msg.data)


def _no_server_errors(relay) -> None:
    log = relay.process.output()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


def test_one_identity_holds_at_most_max_links_and_max_probes(relay, tmp_path):
    identity = _identity(relay, tmp_path)
    url = f"wss://127.0.0.1:{relay.port}/link"
    context = _context(relay, identity)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            regular = await http.ws_connect(url, ssl=context)
            await regular.send_str(_hello(False))
            assert (await _answer(regular))["type"] == "answer"
            probes = []
            for _ in range(MAX_PROBES):  # `authgw check` from several places at once: all answered
                probe = await http.ws_connect(url, ssl=context)
                await probe.send_str(_hello(True))
                assert (await _answer(probe))["type"] == "answer"
                probes.append(probe)
            # a fifth probe is told and closed; the regular link and the probes stay
            extra = await http.ws_connect(url, ssl=context)
            await extra.send_str(_hello(True))
            refused = await _answer(extra)
            assert refused["type"] == "error" and refused["body"]["code"] == "too_many_links", refused
            closing = await extra.receive(timeout=10)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4005)
            # links that have not said hello (yet) count too, up to MAX_LINKS in all
            silent = [await http.ws_connect(url, ssl=context) for _ in range(MAX_LINKS - 1 - MAX_PROBES)]
            state = _state(relay, identity)
            assert (state["open_links"], state["probes"]) == (MAX_LINKS, MAX_PROBES), state
            for _ in range(5):  # refused before the upgrade, with the protocol's error
                with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                    await http.ws_connect(url, ssl=context)
                assert refusal.value.status == 429
            async with http.get(f"https://127.0.0.1:{relay.port}/link", ssl=context) as response:
                assert response.status == 429 and (await response.json())["error"] == "too_many_links"
            assert _state(relay, identity)["open_links"] == MAX_LINKS
            # the connector's own link was never disturbed, and a freed slot is usable again
            for ws in silent:
                await ws.close()
            fresh = await http.ws_connect(url, ssl=context)
            await fresh.send_str(_hello(False))  # a re-dial: replaces the regular link
            assert (await _answer(fresh))["type"] == "answer"
            assert (await regular.receive(timeout=10)).data == 4004
            for ws in (fresh, *probes):
                await ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    lines = [line for line in relay.process.output().splitlines()
             if f"refused a link of connector {identity.connector_id}" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines  # one burst, one line (7 refusals)
    _no_server_errors(relay)


def test_the_replay_record_is_shared_by_an_identitys_links_and_bounded(relay, tmp_path):
    identity = _identity(relay, tmp_path)
    url = f"wss://127.0.0.1:{relay.port}/link"
    context = _context(relay, identity)
    flood = 200

    async def scenario():
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(url, ssl=context)
            stamp = proto.new_stamp(now=time.time(), timeout=5)
            await first.send_str(_hello(True, stamp=stamp))
            assert (await _answer(first))["type"] == "answer"
            # the same request on another link of the same identity is a replay
            second = await http.ws_connect(url, ssl=context)
            await second.send_str(_hello(True, stamp=stamp))
            replayed = await _answer(second)
            assert replayed["type"] == "error" and replayed["body"]["code"] == "replayed", replayed
            await second.close()
            # a flood of fresh probe hellos (what filled 200,000 entries per link) is cut short
            for _ in range(flood):
                await first.send_str(_hello(True))
            codes = []
            while True:
                msg = await first.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    codes.append(("closed", first.close_code))
                    break
                frame = json.loads(msg.data)
                codes.append(frame["body"]["code"] if frame["type"] == "error" else frame["type"])
            return codes

    codes = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert codes[-1] == ("closed", 1008), codes[-3:]  # too many refused frames
    assert codes.count("unavailable") == 20 and codes.count("answer") < flood - 20, codes
    state = wait_for(lambda: (s := _state(relay, identity))["open_links"] == 0 and s, 10, what="the link released")
    skew = 30.0  # relay.max_clock_skew, default
    capacity = 2 * (relay_hub.REQUEST_BURST + math.ceil(relay_hub.REQUEST_RATE * (proto.MAX_AHEAD + 2 * skew))) + 2
    assert state["replay_capacity"] == capacity < 1000, state
    # two entries (nonce, id) for each request accepted, however many links carried them
    assert state["replay_entries"] == 2 * (1 + codes.count("answer")) <= capacity, (state, codes.count("answer"))
    assert state["links"] == 0, state
    _no_server_errors(relay)


def test_a_link_that_says_no_hello_is_closed(relay, tmp_path):
    identity = _identity(relay, tmp_path)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=_context(relay, identity))
            assert _state(relay, identity)["links"] == 1
            msg = await ws.receive(timeout=40)  # the relay's hello timeout is 10 s; the WebSocket pings answer
            return msg.type, msg.data

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == (aiohttp.WSMsgType.CLOSE, 1008)
    wait_for(lambda: _state(relay, identity).get("open_links", 0) == 0, 10, what="the silent link released")
    assert f"connector {identity.connector_id}: closing its link" in relay.process.output()
    _no_server_errors(relay)


# -- the replay record itself (no relay process) ----------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_connector_keeping_to_the_rate_never_fills_its_replay_record():
    clock, now = _Clock(), 1_800_000_000.0
    guard = relay_hub.ConnectorGuard(30.0, clock=clock)
    accepted = 0
    for step in range(3 * int(guard.window)):  # three windows at the accepted rate, each request as far ahead as allowed
        wall = now + step / relay_hub.REQUEST_RATE
        clock.t = 1000.0 + step / relay_hub.REQUEST_RATE
        for _ in range(relay_hub.REQUEST_BURST if step == 0 else 1):
            text = json.dumps({"v": proto.VERSION, "id": secrets.token_hex(8), "type": "hello",
                               "deadline": wall + 30 + proto.MAX_AHEAD, "nonce": secrets.token_urlsafe(16),
                               "body": {}})
            proto.decode(text, now=wall, skew=30.0, guard=guard)
            accepted += 1
        assert len(guard) <= guard.max_entries
    assert accepted > guard.max_entries


def test_beyond_the_rate_requests_are_refused_and_a_full_record_forgets_nothing():
    clock = _Clock()
    guard = relay_hub.ConnectorGuard(30.0, clock=clock)
    now = 1_800_000_000.0
    for i in range(relay_hub.REQUEST_BURST):
        assert guard.fresh(f"nonce-{i:012d}", now + 100, now, f"id-{i}")
    with pytest.raises(proto.ProtocolError) as refused:
        guard.fresh("one-more-nonce-0000", now + 100, now, "one-more")
    assert refused.value.code == "unavailable"
    clock.t += 1 / relay_hub.REQUEST_RATE
    assert guard.fresh("one-more-nonce-0000", now + 100, now, "one-more")
    # full of live entries (a wall clock stepped back): refused, saying so, nothing forgotten
    small = proto.ReplayGuard(max_entries=4)
    first = json.dumps({"v": proto.VERSION, "id": "a", "type": "hello", "deadline": now + 10, "nonce": "n" * 16,
                        "body": {}})
    second = first.replace('"a"', '"b"').replace("n" * 16, "m" * 16)
    third = first.replace('"a"', '"c"').replace("n" * 16, "o" * 16)
    proto.decode(first, now=now, guard=small)
    proto.decode(second, now=now, guard=small)
    with pytest.raises(proto.ProtocolError) as full:
        proto.decode(third, now=now, guard=small)
    assert full.value.code == "replayed" and "too many requests" in full.value.detail and len(small) == 4
    with pytest.raises(proto.ProtocolError) as again:
        proto.decode(first, now=now, guard=small)
    assert again.value.code == "replayed"
