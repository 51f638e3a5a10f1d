"""A small OCSP responder and CRL server on 127.0.0.1, in a thread of the test process.

Built with ``cryptography``'s OCSP builder: answers are real, signed RFC 6960 responses, so the
plugin's verification runs unchanged. ``start()`` binds a free port; ``stop()`` shuts it down.

* ``POST /ocsp``: signed by a delegated responder certificate when the issuer was registered
  with one, else by the issuing CA itself. ``good`` for every serial of a registered issuer
  unless :meth:`revoke`d; ``unauthorized`` for an unknown issuer. ``nonce_mode`` = ``echo``
  (default), ``omit`` or ``wrong``.
* ``GET /crl/NAME``: the DER bytes put with :meth:`put_crl`.

``hits`` counts requests per path, for asserting caching.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from support.pki import CA, Issued

UTC = dt.timezone.utc

__all__ = ["PkiServer"]


def _key_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    # issuerKeyHash: the hash of the subjectPublicKey BIT STRING (RFC 6960 4.1.1); for SHA-1 it
    # is the same value as the RFC 5280 method-1 subjectKeyIdentifier.
    if isinstance(algorithm, hashes.SHA1):
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    raise ValueError("the test responder only does SHA-1 CertIDs")


class PkiServer:
    def __init__(self) -> None:
        self.issuers: dict[bytes, tuple[CA, Issued | None]] = {}
        self.revoked: dict[int, dt.datetime] = {}
        self.crls: dict[str, bytes] = {}
        self.nonce_mode = "echo"
        self.validity = dt.timedelta(hours=1)
        self.hits: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration ---------------------------------------------------------------------------

    def add_issuer(self, ca: CA, responder: Issued | None = None) -> None:
        """Answer for certificates issued by *ca*, signing with *responder* (a delegated
        responder certificate issued by *ca* with the OCSPSigning EKU) or with *ca* itself."""
        self.issuers[_key_hash(ca.cert, hashes.SHA1())] = (ca, responder)

    def revoke(self, cert: Issued, when: dt.datetime | None = None) -> None:
        self.revoked[cert.cert.serial_number] = when or dt.datetime.now(UTC) - dt.timedelta(minutes=1)

    def put_crl(self, name: str, der: bytes) -> str:
        self.crls[name] = der
        return self.url(f"/crl/{name}")

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> PkiServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                owner.hits[self.path] += 1
                name = self.path.removeprefix("/crl/")
                if self.path.startswith("/crl/") and name in owner.crls:
                    self._send(200, owner.crls[name], "application/pkix-crl")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def do_POST(self) -> None:
                owner.hits[self.path] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/ocsp":
                    self._send(404, b"not found\n", "text/plain")
                    return
                self._send(200, owner.answer(body), "application/ocsp-response")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-pki-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    # -- OCSP ---------------------------------------------------------------------------------------

    def answer(self, body: bytes) -> bytes:
        try:
            request = ocsp.load_der_ocsp_request(body)
        except ValueError:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST).public_bytes(serialization.Encoding.DER)
        found = self.issuers.get(request.issuer_key_hash)
        if found is None:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER)
        ca, responder = found
        now = dt.datetime.now(UTC)
        revoked_at = self.revoked.get(request.serial_number)
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash, issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number, algorithm=request.hash_algorithm,
            cert_status=ocsp.OCSPCertStatus.REVOKED if revoked_at else ocsp.OCSPCertStatus.GOOD,
            this_update=now - dt.timedelta(seconds=30), next_update=now + self.validity,
            revocation_time=revoked_at, revocation_reason=x509.ReasonFlags.key_compromise if revoked_at else None)
        signer = responder or ca
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
        if responder is not None:
            builder = builder.certificates([responder.cert])
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            nonce = None
        if nonce is not None and self.nonce_mode != "omit":
            sent = nonce if self.nonce_mode == "echo" else bytes(reversed(nonce))
            builder = builder.add_extension(x509.OCSPNonce(sent), critical=False)
        return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
