"""A relay that is not one, for the connector's side of the link (tests/test_link_review.py):
an aiohttp server on a thread and event loop of its own, on 127.0.0.1, with TLS from a test CA
(or none: the cleartext server a redirect points at), its routes given by the test; and a
connector (``authgw serve``, chain ``[static]``, plugins ``[link]``) enrolled by hand with that
CA pinned, so that nothing but the test's relay stands at the other end of its link.

API::

    ca = CA.create("relay CA")
    relay = HostileRelay(tmp_path, ca, [("GET", "/link", handler)]).start()   # async handler(request)
    relay.port, relay.url, relay.call(coro)
    conn = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    conn.key, conn.output(), conn.link_dir
    relay.stop(); conn.stop()                     # by PID (GatewayProcess), fixtures' finally

Frames the connector sends are read with :func:`frames`; :func:`answer_hello` answers its hello.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import threading
import time
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.passwords import hash_password
from gateway.plugins import linkproto as proto
from support.gateway import GatewayProcess, static_users, write_conf
from support.net import free_port
from support.pki import CA

__all__ = ["CONNECTOR", "HandEnrolled", "HostileRelay", "answer_hello", "connector_certificate", "connector_conf",
           "frames", "pem"]

CONNECTOR = "acme-0123abcd"
UTC = dt.timezone.utc


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def connector_certificate(ca: CA, public_key, *, not_before: float, not_after: float,
                          cn: str = CONNECTOR) -> x509.Certificate:
    """A connector certificate as the relay issues them (CN the connector id, clientAuth)."""
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(not_before, UTC))
            .not_valid_after(dt.datetime.fromtimestamp(not_after, UTC))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))


class HostileRelay:
    """*routes* ``(method, path, async handler(request))`` served on 127.0.0.1, over TLS with a
    certificate of *ca* for 127.0.0.1 (asking for, not requiring, a client certificate), or in
    cleartext when *ca* is ``None``."""

    def __init__(self, directory: Path, ca: CA | None, routes) -> None:
        self.port = free_port()
        self.routes = list(routes)
        self.context = None
        if ca is not None:
            cert, key = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True).write(directory, f"relay{self.port}")
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(cert), str(key))
            self.context.verify_mode = ssl.CERT_OPTIONAL
            self.context.load_verify_locations(cadata=ca.pem.decode())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> HostileRelay:
        async def start() -> None:
            app = web.Application()
            for method, path, handler in self.routes:
                app.router.add_route(method, path, handler)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.context).start()

        self.thread.start()
        self.call(start())
        return self

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.runner is not None:
            try:
                self.call(self.runner.cleanup())
            except Exception:  # noqa: BLE001 - stopping regardless
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def frames(ws):
    """The connector's text frames on *ws*, as JSON objects (pings and the rest skipped)."""
    async for msg in ws:
        if msg.type.name == "TEXT":
            yield json.loads(msg.data)


async def answer_hello(ws, frame: dict) -> None:
    await ws.send_str(proto.answer(frame["id"], {"time": time.time(), "connector": CONNECTOR,
                                                 "not_after": frame["body"]["not_after"]}))


def after_hello(on_frame):
    """A relay's ``/link`` handler (for :class:`HostileRelay`) that answers each ``hello`` and
    hands every other frame to ``await on_frame(ws, frame)``."""

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in frames(ws):
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
            else:
                await on_frame(ws, frame)
        return ws

    return link


def connector_conf(conf: Path, link: dict | None = None) -> Path:
    """A connector's conf.d in *conf*: chain ``[static]`` (alice), plugins ``[link]`` with fast
    back-off and pings (0.2-2 s, 1 s) and *link*'s settings."""
    settings = {"backoff_initial": 0.2, "backoff_max": 2.0, "ping_interval": 1.0, **(link or {})}
    return write_conf(conf, {"gateway.yaml": "chain: [static]\nplugins: [link]\nthrottle: {enabled: false}\n",
                             "link.yaml": "link: " + json.dumps(settings) + "\n",
                             **static_users({"alice": hash_password("Alice-Passw0rd")})})


class HandEnrolled:
    """A connector enrolled by hand at *link_url*: its own P-256 key, a certificate of *ca* for
    ``CONNECTOR`` (valid from *not_before* to *not_after*, by default a day from a minute ago),
    *ca* pinned. One static user, alice. Back-off and pings fast (0.2-2 s, 1 s)."""

    def __init__(self, directory: Path, ca: CA, link_url: str, *, not_before: float | None = None,
                 not_after: float | None = None, link: dict | None = None) -> None:
        self.conf = directory / "conf.d"
        self.state = directory / "state"
        self.link_dir = self.state / "link"
        self.link_dir.mkdir(mode=0o700, parents=True)
        connector_conf(self.conf, link)
        now = time.time()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = connector_certificate(ca, self.key.public_key(),
                                                 not_before=now - 60 if not_before is None else not_before,
                                                 not_after=now + 86400 if not_after is None else not_after)
        key_pem = self.link_dir / "key.pem"
        key_pem.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        key_pem.chmod(0o600)
        (self.link_dir / "cert.pem").write_text(pem(self.certificate))
        (self.link_dir / "relay-ca.pem").write_bytes(ca.pem)
        (self.link_dir / "link.json").write_text(json.dumps({"link_url": link_url, "connection": "acme",
                                                             "connector": CONNECTOR, "pinned": True}))
        self.process: GatewayProcess | None = None

    def start(self) -> HandEnrolled:
        self.process = GatewayProcess(self.conf, self.state).start()
        return self

    def output(self) -> str:
        return self.process.output() if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
