"""The connector's side of the link against a hostile relay, fourth review: each test runs a
real connector (``authgw serve`` with ``plugins: [link]``) against a relay that is not what it
should be (tests/support/hostile_relay.py), on 127.0.0.1.

- a relay flooding WebSocket pings (or pongs) has its link closed (1008), as the relay closes
  a connector's: each was answered, without count, on the event loop the connector's own front
  doors share;
- a certificate at enrolment that names another connector beside this one, or that has
  ended, is refused and the enrolment in place kept (it was written over it);
- an address the relay names as ``client`` has a failure budget apart from the same address
  at the connector's own front doors (it spent theirs: 429 for intranet users at ``/auth``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from gateway.plugins import linkproto as proto
from support.gateway import authgw
from support.hostile_relay import CONNECTOR, HandEnrolled, HostileRelay, answer_hello, frames, pem
from support.net import wait_for
from support.pki import CA

#: Server-to-client WebSocket frames (unmasked, RFC 6455 5.2) with no payload.
PING, PONG = b"\x89\x00", b"\x8a\x00"


def _flooding(frame: bytes, count: int, closed: list):
    """A ``/link`` handler that answers hello, then writes *count* control frames *frame* straight
    to the connection, as fast as the connector takes them, and notes the close code it gets."""

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)

        async def flood() -> None:
            chunk, left = frame * 10_000, count
            while left > 0 and not ws.closed and not request.transport.is_closing():
                request.transport.write(chunk)
                left -= 10_000
                while request.transport.get_write_buffer_size() > 1_000_000 and not request.transport.is_closing():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0)

        flooding = None
        async for msg in ws:
            if msg.type.name == "TEXT" and json.loads(msg.data)["type"] == "hello":
                await answer_hello(ws, json.loads(msg.data))
                flooding = flooding or asyncio.ensure_future(flood())
        if flooding is not None:
            flooding.cancel()
        closed.append(ws.close_code)
        return ws

    return link


@pytest.mark.parametrize("frame", [PING, PONG], ids=["pings", "pongs"])
def test_a_relay_flooding_pings_has_its_link_closed(tmp_path, stack, frame):
    """A relay sending a million pings: the connector answered each on the event loop its own
    ``/auth`` and login door run on (its ``/auth`` went from a 64 ms median to 4.2 s while one
    flooded), and never closed the link. Now pings and pongs beyond a burst of 100, then 50 a
    second, close it (1008), and the connector dials again."""
    ca = CA.create("relay CA")
    closed: list = []
    relay = HostileRelay(tmp_path, ca, [("GET", "/link", _flooding(frame, 1_000_000, closed))]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: "closed by the connector (1008: too many pings)" in connector.output(), 60,
             what="the flooded link to be closed by the connector", log=connector.output)
    wait_for(lambda: closed, 10, what="the relay to see the close", log=connector.output)
    assert closed[0] == 1008, closed
    wait_for(lambda: connector.output().count("link up:") >= 2, 30, what="the connector to dial again",
             log=connector.output)
    assert connector.process.auth("alice", "Alice-Passw0rd").status == 200


# -- 2. a certificate at enrolment that the connector could not link with ---------------------------------------


TOKEN = "T0KEN_abcdefghijklmnopqrstuvwxyz0123"


def _issuing(ca: CA, link_url: list, *, names: list[str], lifetime: tuple[float, float]):
    """An enrolment endpoint (``/p/{token}``) that answers the CSR with a certificate of *ca* for
    the CSR's key, named *names* (CNs) and valid *lifetime* (seconds from now)."""

    async def ticket(request: web.Request) -> web.Response:
        info = {"protocol": 2, "connection": "acme", "connector": "acme-feedf00d", "link_url": link_url[0]}
        if request.method == "GET":
            return web.json_response({**info, "expires": time.time() + 600, "csr_subject": "CN=acme-feedf00d",
                                      "key": "P-256"})
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        now = time.time()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names]))
                .issuer_name(ca.cert.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(dt.datetime.fromtimestamp(now + lifetime[0], dt.timezone.utc))
                .not_valid_after(dt.datetime.fromtimestamp(now + lifetime[1], dt.timezone.utc))
                .sign(ca.key, hashes.SHA256()))
        return web.json_response({**info, "certificate": pem(cert), "ca": ca.pem.decode()})

    return ticket


@pytest.mark.parametrize("names, lifetime, said", [
    (["acme-feedf00d", "acme-0123abcd"], (-60, 86400), "a certificate for another name"),
    (["acme-feedf00d"], (-7200, -3600), "a certificate that expired at"),
], ids=["two-names", "expired"])
def test_a_certificate_the_connector_cannot_link_with_does_not_replace_its_enrolment(tmp_path, stack, names,
                                                                                      lifetime, said):
    """Re-enrolment with a relay answering a certificate that names another connector beside
    this one, or one that has ended: ``authgw link enroll`` said "enrolled" (exit 0) and wrote
    it over the working enrolment, which ``link status`` then called damaged (two CNs: enrolment
    read the first, every other reader wants exactly one) or expired, the ticket spent. Now it
    is refused in one line and the enrolment in place is kept."""
    ca = CA.create("relay CA")
    link_url: list = []
    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", _issuing(ca, link_url, names=names,
                                                                        lifetime=lifetime))]).start()
    stack.append(relay)
    link_url.append(f"wss://127.0.0.1:{relay.port}/link")
    working = HandEnrolled(tmp_path / "c", ca, link_url[0])  # enrolled, not started
    before = {name: (working.link_dir / name).read_bytes() for name in ("link.json", "cert.pem", "key.pem")}
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    result = authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"),
                    "--config", str(working.conf), "--state-dir", str(working.state), timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert {name: (working.link_dir / name).read_bytes() for name in before} == before
    status = authgw("link", "status", "--config", str(working.conf), "--state-dir", str(working.state))
    assert status.returncode == 0 and "acme-0123abcd" in status.stdout, (status.stdout, status.stderr)


# -- 3. the relay's `client` and the connector's own front doors -----------------------------------------------


def _authenticate(key, username: str, password: str, client: str) -> str:
    stamp = proto.new_stamp(now=time.time(), timeout=10)
    body = {"username": username, "client": client, "request_id": "r", "front_door": "forward_auth"}
    body["password"] = proto.seal_password(key.public_key(), password, stamp, connector=CONNECTOR, body=body)
    return proto.request("authenticate", body, stamp=stamp)[1]


def test_a_relay_spends_no_address_budget_of_the_connectors_own_front_doors(tmp_path, stack):
    """The relay says which address a login came from (``client``), and the connector throttles
    that address: in the budget its own ``/auth`` and login door keep for the addresses of its
    network. A relay naming an intranet address (here 127.0.0.1) in ``client_failures`` guesses
    at unknown names had the connector answer 429 to that address's right password at its own
    ``/auth`` for the whole window; another address still got 200."""
    ca = CA.create("relay CA")
    answers: list = []
    connector: HandEnrolled | None = None

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in frames(ws):
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
                for i in range(5):
                    await ws.send_str(_authenticate(connector.key, f"nobody{i}", "Wr0ng-guess", "127.0.0.1"))
            else:
                answers.append(frame)
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link")
    gateway_yaml = connector.conf / "gateway.yaml"
    gateway_yaml.write_text(gateway_yaml.read_text().replace("throttle: {enabled: false}",
                                                             "throttle: {client_failures: 5}"))
    connector.start()
    stack.append(connector)
    wait_for(lambda: len(answers) == 5, 30, what="the relay's five guesses answered", log=connector.output)
    assert {frame["body"]["outcome"] for frame in answers} == {"user_not_found"}, answers
    assert connector.process.auth("alice", "Alice-Passw0rd", source_address=("127.0.0.2", 0)).status == 200
    assert connector.process.auth("alice", "Alice-Passw0rd").status == 200  # from 127.0.0.1
