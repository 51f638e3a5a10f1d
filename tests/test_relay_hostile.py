"""Issue 13, hostile input at the relay: a link without a certificate or with a foreign one,
forged and replayed requests, expired deadlines, oversized and binary frames, slow-loris
clients, revoked connectors. Every refusal is a 4xx or a protocol error, never a 5xx, and the
relay keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time

import aiohttp
import pytest

from gateway.plugins import linkproto as proto
from support.linkenv import Connector, Relay
from support.net import wait_for
from support.pki import self_signed


class NoDirectory:
    """A connector conf.d whose directory is nowhere: the link does not need one."""

    def plugin_settings(self, mode, **overrides):
        return {"preset": "openldap", "base_dn": "dc=example,dc=com", "servers": ["ldap://127.0.0.1:9"],
                "insecure": True, "direct_bind": "uid={username},ou=people,dc=example,dc=com", **overrides}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    server = Relay(tmp_path_factory.mktemp("relay")).setup().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def identity(relay, tmp_path_factory):
    """An enrolled connector's state directory (not running): the test plays that connector."""
    connector = Connector(tmp_path_factory.mktemp("forger"), NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    return connector


def _context(relay, identity=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    if identity is not None:
        link = identity.state / "link"
        context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
    return context


async def _link(relay, context, frames, *, wait: float = 1.0) -> list:
    """Open the link, send *frames* (str, bytes), collect what comes back until quiet."""
    received = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=context) as ws:
            for frame in frames:
                if isinstance(frame, bytes):
                    await ws.send_bytes(frame)
                else:
                    await ws.send_str(frame)
            while True:
                try:
                    msg = await ws.receive(timeout=wait)
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    received.append(("closed", ws.close_code))
                    break
                received.append(json.loads(msg.data))
    return received


def _no_server_errors(relay) -> None:
    log = relay.process.output()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    assert relay.process.get("/healthz").status == 200


def test_the_link_needs_a_certificate_from_the_relay_ca(relay):
    async def without():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{relay.port}/link", ssl=_context(relay)) as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(without())
    assert (status, body["error"]) == (401, "certificate_required")
    foreign = self_signed("acme-forged")
    context = _context(relay)
    directory = relay.directory / "foreign"
    directory.mkdir(exist_ok=True)
    cert, key = foreign.write(directory, "foreign")
    context.load_cert_chain(str(cert), str(key))
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        asyncio.run(_link(relay, context, []))
    _no_server_errors(relay)


def test_forged_expired_replayed_and_malformed_requests_are_refused(relay, identity):
    now = time.time()
    _, forged = proto.request("authenticate", {"username": "alice"}, now=now, timeout=5)  # relay-to-connector only
    _, hello = proto.request("hello", {"version": "test"}, now=now, timeout=5)
    expired = json.loads(proto.request("hello", {}, now=now - 60, timeout=5)[1])
    frames = [forged, hello, hello.replace(json.loads(hello)["id"], "another-id"), json.dumps(expired),
              "not json", b"\x00binary", json.dumps({"v": 1, "id": "x", "type": "renew", "deadline": now + 5,
                                                    "nonce": "n" * 20, "body": {"csr": "garbage"}})]
    received = asyncio.run(_link(relay, _context(relay, identity), frames))
    errors = [(m["body"]["code"] if m["type"] == "error" else m["type"]) for m in received]
    assert errors == ["unknown_type", "answer", "replayed", "expired", "bad_request", "bad_request", "bad_request"]
    _no_server_errors(relay)


def test_an_oversized_frame_closes_that_link_only(relay, identity):
    received = asyncio.run(_link(relay, _context(relay, identity), ["x" * (proto.MAX_FRAME + 10)]))
    # aiohttp answers "message too big" (1009, RFC 6455 7.4.1) and drops the connection: the
    # client sees 1009 or an abnormal closure, depending on which arrives first
    assert len(received) == 1 and received[0][0] == "closed" and received[0][1] in (1006, 1009)
    assert asyncio.run(_link(relay, _context(relay, identity), [proto.request("hello", {}, now=time.time(),
                                                                              timeout=5)[1]]))[0]["type"] == "answer"
    _no_server_errors(relay)


def test_slow_loris_clients_do_not_stop_enrolment_or_links(relay, identity):
    slow = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
            slow.append(sock)
        # served while 30 handshakes hang
        received = asyncio.run(_link(relay, _context(relay, identity),
                                     [proto.request("hello", {}, now=time.time(), timeout=5)[1]], wait=0.5))
        assert received[0]["type"] == "answer"
    finally:
        for sock in slow:
            sock.close()
    _no_server_errors(relay)


def test_a_revoked_connector_is_cut_off_and_refused(relay, tmp_path):
    connector = Connector(tmp_path / "c", NoDirectory()).enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)
        result = relay.cli("relay", "revoke", connector.connector_id)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: connector.connector_id not in relay.ready_links(), 10, what="the revoked link to drop")
        time.sleep(3)  # the connector keeps re-dialling, and keeps being refused
        assert connector.connector_id not in relay.ready_links()
        assert "revoked" in connector.process.output()
        assert "revoked" in relay.cli("relay", "connectors").stdout
    finally:
        connector.stop()
    _no_server_errors(relay)
