"""What a connector takes from outside at enrolment and renewal (review of the link):

* the ticket URL (``authgw link enroll URL`` or ``-`` for standard input): one with a space in
  its token reached http.client, whose uncaught ``InvalidURL`` printed a traceback quoting the
  URL, token included; it is now checked as the relay checks tokens, before any request, and no
  message shows it;
* a relay answering renewal with a certificate of another issuer, name or validity: the
  connector stored it and failed every later dial until it enrolled again; now it keeps its
  certificate and logs an ERROR.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import threading
import time

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.plugins import linkproto as proto
from support.gateway import authgw
from support.linkenv import Connector, NoDirectory
from support.net import free_port, wait_for
from support.pki import CA

TOKEN = "SECRETTOKEN_abcdefghijklmnopqrstuvwxyz012345"
UTC = dt.timezone.utc


def _enrol(connector: Connector, url: str, *, stdin: bool, ca=None):
    extra = ["--ca", str(ca)] if ca else []
    if stdin:
        return authgw("link", "enroll", "-", *extra, "--config", str(connector.conf), "--state-dir",
                      str(connector.state), input=url + "\n", timeout=30)
    return authgw("link", "enroll", url, *extra, "--config", str(connector.conf), "--state-dir",
                  str(connector.state), timeout=30)


def _refused_cleanly(result, secret: str = TOKEN) -> str:
    """The error line (the last: the configuration's warnings come first), the output asserted
    free of the token and of a traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: enrolment failed: "), result.stderr
    return line


@pytest.mark.parametrize("url", [
    f"https://127.0.0.1:9/p/{TOKEN} x",  # the review's: a pasted line with more on it
    f"https://127.0.0.1:9/p/{TOKEN}\tx",
    f"https://127.0.0.1:9/p/{TOKEN}\x7f",
    f"https://127.0.0.1:9/p/{TOKEN}é",
    f"https://127.0.0.1:9/p/{TOKEN}/more",
    f"https://127.0.0.1:9/p/{TOKEN}?x=1",
    f"https://127.0.0.1:9/p/{TOKEN}#x",
    f"https://127.0.0.1:9x/p/{TOKEN}",
    f"https://user@127.0.0.1:9/p/{TOKEN}",
    f"http://127.0.0.1:9/p/{TOKEN}",
    f"https://127.0.0.1:9/q/{TOKEN}",
    "https://127.0.0.1:9/p/SECRET_short",
])
@pytest.mark.parametrize("stdin", [False, True], ids=["argv", "stdin"])
def test_a_bad_ticket_url_is_refused_before_any_request_without_showing_it(tmp_path, url, stdin):
    result = _enrol(Connector(tmp_path / "c", NoDirectory()), url, stdin=stdin)
    line = _refused_cleanly(result, secret="SECRET")
    assert "a ticket URL looks like https://relay.example/p/TOKEN" in line


def test_an_unreachable_relay_names_its_host_not_the_ticket(tmp_path):
    for stdin in (False, True):
        result = _enrol(Connector(tmp_path / "c", NoDirectory()), f"https://127.0.0.1:9/p/{TOKEN}", stdin=stdin)
        assert "cannot reach the relay at 127.0.0.1:9" in _refused_cleanly(result)


def test_an_answer_that_is_not_http_is_a_clean_error(tmp_path):
    """http.client's errors are not OSErrors: a TLS server answering something else than HTTP
    (a status line it cannot read) left a traceback."""
    ca = CA.create()
    cert, key = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True).write(tmp_path / "tls", "server")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"NOT-HTTP garbage\r\n\r\n")
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        for stdin in (False, True):
            result = _enrol(Connector(tmp_path / "c", NoDirectory()), f"https://127.0.0.1:{port}/p/{TOKEN}",
                            stdin=stdin, ca=tmp_path / "ca.pem")
            assert _refused_cleanly(result) == "error: enrolment failed: bad answer from the relay: BadStatusLine"
    finally:
        listener.close()
        thread.join(5)


# -- renewal: the certificate a relay answers ----------------------------------------------------------


def _certificate(issuer: CA, public_key, cn: str, *, not_before: float, not_after: float) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer.cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(not_before, UTC))
            .not_valid_after(dt.datetime.fromtimestamp(not_after, UTC))
            .sign(issuer.key, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class FakeRelay:
    """A relay's link endpoint (TLS with a certificate of *ca*, on a thread of its own) that
    answers ``hello`` and answers the n-th ``renew`` (from 1) with the certificate ``renewals[n-1]``."""

    def __init__(self, directory, ca: CA, connector: str, renewals: list[x509.Certificate]) -> None:
        self.port = free_port()
        self.ca, self.connector, self.renewals = ca, connector, renewals
        self.renews = 0
        cert, key = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True).write(directory, "relay")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["type"] == "hello":
                await ws.send_str(proto.answer(frame["id"], {"time": time.time(), "connector": self.connector,
                                                             "not_after": frame["body"]["not_after"]}))
            elif frame["type"] == "renew":
                self.renews += 1
                cert = self.renewals[min(self.renews, len(self.renewals)) - 1]
                await ws.send_str(proto.answer(frame["id"], {"certificate": _pem(cert), "ca": self.ca.pem.decode()}))
        return ws

    def start(self) -> FakeRelay:
        async def start() -> None:
            app = web.Application()
            app.router.add_get("/link", self._link)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.context).start()

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_a_renewed_certificate_of_another_issuer_name_or_validity_is_not_stored(tmp_path):
    ca, stranger = CA.create("relay CA"), CA.create("another CA")
    connector_id = "acme-0123abcd"
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    # Renewal is due at once (two thirds of its life are over), the certificate still valid.
    current = _certificate(ca, key.public_key(), connector_id, not_before=now - 200, not_after=now + 100)
    good = _certificate(ca, key.public_key(), connector_id, not_before=now - 60, not_after=now + 3600)
    renewals = [
        _certificate(stranger, key.public_key(), connector_id, not_before=now - 60, not_after=now + 3600),
        _certificate(ca, key.public_key(), "acme-ffffffff", not_before=now - 60, not_after=now + 3600),
        _certificate(ca, key.public_key(), connector_id, not_before=now - 3600, not_after=now - 60),
        _certificate(ca, key.public_key(), connector_id, not_before=now + 3600, not_after=now + 7200),
        good,
    ]
    connector = Connector(tmp_path / "c", NoDirectory())
    relay = FakeRelay(tmp_path / "tls", ca, connector_id, renewals).start()
    link = connector.state / "link"
    link.mkdir(mode=0o700)
    (link / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (link / "key.pem").chmod(0o600)
    (link / "cert.pem").write_text(_pem(current))
    (link / "relay-ca.pem").write_bytes(ca.pem)
    (link / "link.json").write_text(json.dumps({"link_url": f"wss://127.0.0.1:{relay.port}/link",
                                                "connection": "acme", "connector": connector_id, "pinned": True}))
    try:
        connector.start()
        wait_for(lambda: relay.renews >= 4, 30, what="four renewal answers", log=connector.process.output)
        assert (link / "cert.pem").read_text() == _pem(current)  # kept: each answer was refused
        failures = [line for line in connector.process.output().splitlines() if "certificate renewal failed" in line]
        assert all("ERROR" in line for line in failures)
        for why in ("is not issued by the relay CA", f"is not for connector {connector_id}", "is not valid now"):
            assert any(why in line for line in failures), (why, failures)
        wait_for(lambda: "certificate renewed over the link" in connector.process.output(), 20,
                 what="the good certificate to be stored", log=connector.process.output)
        assert (link / "cert.pem").read_text() == _pem(good)
    finally:
        connector.stop()
        relay.stop()
