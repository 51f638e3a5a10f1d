"""The connector's side of the link against a relay that is not what it should be, third review:
each test runs a real connector (``authgw serve``, ``authgw link enroll``, ``authgw link status``)
against a hostile relay on 127.0.0.1 (tests/support/hostile_relay.py).

- a renewal answered on a link opened before ``authgw link enroll`` ran again stored the old
  key's certificate over the new enrolment's ``cert.pem``: the new enrolment was damaged, its
  ticket spent, and the connector could not dial until enrolled once more;
- a link URL or connection name holding a newline or terminal escapes, stored as the relay sent
  it, was printed raw by ``authgw link status`` (a forged line, the terminal's title set).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.plugins import linkproto as proto
from gateway.plugins.link import state
from support.gateway import authgw
from support.hostile_relay import HandEnrolled, HostileRelay, after_hello, connector_certificate, connector_conf, pem
from support.net import wait_for
from support.pki import CA

TOKEN = "T0KEN_abcdefghijklmnopqrstuvwxyz0123"
NEW_CONNECTOR = "acme-99999999"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create("relay CA")


def _status(connector: HandEnrolled):
    return authgw("link", "status", "--config", str(connector.conf), "--state-dir", str(connector.state))


# -- 1. a renewal on the link of the enrolment before -------------------------------------------------------


def test_a_renewal_on_a_link_older_than_the_enrolment_does_not_damage_it(tmp_path, stack, ca):
    """The connector is linked, its renewal due; ``authgw link enroll`` writes a new enrolment
    (another key, another connector id) while that link lasts; then the relay answers the
    renewal, with a good certificate of the old key. It was stored over the new ``cert.pem``:
    ``link status`` said the enrolment was damaged, and no dial came up again. Now it is not
    stored, and the link is dialled again with the new enrolment."""
    renewals: list[dict] = []
    release = threading.Event()
    connector: HandEnrolled | None = None

    async def renew(ws, frame: dict) -> None:
        if frame["type"] != "renew" or renewals:
            return
        renewals.append(frame)

        async def answer() -> None:  # later, while the relay goes on reading (pongs) meanwhile
            while not release.is_set():
                await asyncio.sleep(0.02)
            now = time.time()
            cert = connector_certificate(ca, connector.key.public_key(), not_before=now - 10,
                                         not_after=now + 90 * 86400)
            await ws.send_str(proto.answer(frame["id"], {"certificate": pem(cert), "ca": ca.pem.decode()}))

        asyncio.ensure_future(answer())

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", after_hello(renew))]).start()
    stack.append(relay)
    now = time.time()  # renewal due at once
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link",
                             not_before=now - 3000, not_after=now + 600).start()
    stack.append(connector)
    wait_for(lambda: renewals, 30, what="a renew request", log=connector.output)

    key = ec.generate_private_key(ec.SECP256R1())  # `authgw link enroll` with a new ticket
    cert = connector_certificate(ca, key.public_key(), not_before=now - 60, not_after=now + 86400, cn=NEW_CONNECTOR)
    state.write_enrolment(connector.link_dir, [
        ("key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), True),
        ("cert.pem", pem(cert).encode(), False),
        ("relay-ca.pem", ca.pem, False),
        ("link.json", json.dumps({"link_url": f"wss://127.0.0.1:{relay.port}/link", "connection": "acme",
                                  "connector": NEW_CONNECTOR, "pinned": True}).encode(), False),
    ])
    release.set()
    wait_for(lambda: f"as {NEW_CONNECTOR}" in connector.output() or "certificate renewed" in connector.output(), 30,
             what="the renewal answered", log=connector.output)
    status = _status(connector)
    assert status.returncode == 0 and f"connector {NEW_CONNECTOR}" in status.stdout, status
    stored = x509.load_pem_x509_certificate((connector.link_dir / "cert.pem").read_bytes())
    assert stored.public_key().public_numbers() == key.public_key().public_numbers()
    wait_for(lambda: f"link up: wss://127.0.0.1:{relay.port}/link as {NEW_CONNECTOR}" in connector.output(), 30,
             what="the link dialled again with the new enrolment", log=connector.output)
    assert "changed since this link opened" in connector.output()
    assert "certificate renewed over the link" not in connector.output()


# -- 2. the relay's words in link.json ------------------------------------------------------------------------


FORGED = "\n\x1b]0;pwned\x07connector admin-00000000 of connection root"


@pytest.mark.parametrize("field", ["link_url", "connection"])
def test_link_status_shows_the_relays_words_printable(tmp_path, stack, ca, field):
    """A ``link_url`` or ``connection`` in ``link.json`` with a newline and an OSC sequence (an
    older version's enrolment stored them as the relay sent them; enrolment now refuses them,
    test_link_left45.py): ``authgw link status`` printed them raw, a forged ``connector`` line,
    the terminal's title set."""

    async def ticket(request: web.Request) -> web.Response:
        words = {"connection": "acme", "connector": "acme-0123abcd", "link_url": "wss://127.0.0.1:1/link"}
        if request.method == "GET":
            return web.json_response({"protocol": 2, **words})
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        now = time.time()
        cert = connector_certificate(ca, csr.public_key(), not_before=now - 60, not_after=now + 86400)
        return web.json_response({"protocol": 2, **words, "certificate": pem(cert), "ca": ca.pem.decode()})

    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    connector_conf(tmp_path / "conf.d")
    args = ("--config", str(tmp_path / "conf.d"), "--state-dir", str(tmp_path / "state"))
    enrol = authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"), *args)
    assert enrol.returncode == 0, enrol
    link_json = tmp_path / "state" / "link" / "link.json"  # as an older enrolment (or a hand) wrote it
    written = json.loads(link_json.read_text())
    link_json.write_text(json.dumps({**written, field: written[field] + FORGED}))
    status = authgw("link", "status", *args)
    assert status.returncode == 0, status
    assert "\x1b" not in status.stdout and "\x07" not in status.stdout, status.stdout
    lines = status.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["connector", "link", "expires"], status.stdout
    shown = lines[1] if field == "link_url" else lines[0]
    assert shown.endswith("\\n\\x1b]0;pwned\\x07connector admin-00000000 of connection root"), status.stdout
