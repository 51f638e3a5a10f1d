"""The TLS listener for certificate logins (``gateway_listeners``).

TLS asks for the client certificate per connection, not per path, so certificate logins get a
listener of their own; the core binds it and serves the same front doors on it.

* ``CERT_OPTIONAL``: a client without a certificate completes the handshake and falls through to
  the other chain steps (Basic, Negotiate). A client whose certificate does not chain to the
  trust bundle fails the handshake: OpenSSL ends the connection before any HTTP is read, so that
  case leaves no audit line (DESIGN.md section 9).
* The trust bundle is the plugin's roots plus its intermediates: Python (<= 3.12) hands the
  application only the leaf, so intermediates cannot come from the client's chain; OpenSSL uses
  the bundled intermediates only to build paths up to a root (no partial-chain flag), so they do
  not become anchors.
* OpenSSL checks the validity window and, for the "SSL client" purpose, an EKU that includes
  clientAuth and a keyUsage with digitalSignature when those extensions are present. The plugin
  checks all of that again (with its own reason codes), as it does for header certificates.
  ``check_validity_in_handshake: false`` sets ``X509_V_FLAG_NO_CHECK_TIME`` so that expired and
  not-yet-valid certificates reach the plugin and are denied with an audit line.
* Client-initiated renegotiation is off: the certificate of a connection cannot change under a
  request.
* No session tickets unless ``session_tickets`` asks for them. With OpenSSL 3.0 a ticket costs a
  copy of the session that decodes the client certificate again: ~0.6 ms of CPU per ticket and
  connection, measured (OpenSSL's default of two took a certificate login from ~2.8 to ~4.3 ms;
  docs/performance.md). A ticket only resumes on the worker that issued it (each has its own
  ticket key) and not after a reload. TLS 1.2 clients can still resume by session ID on the same
  worker (OpenSSL's session cache). The plugin checks a resumed session's certificate again
  either way.
* The server's own chain is found once, when the context is made (:func:`served_chain`). Given a
  certificate file that holds only the server's certificate, OpenSSL builds the chain it sends
  from the context's trust store (the client-certificate bundle) on **every** handshake: a path
  search and a signature check per issuer, ~95 µs of a ~1.5 ms certificate login, measured. The
  context is loaded with the same issuers instead, so clients see the same certificates and
  OpenSSL sends them as they are. A file that already holds its chain is used as it is.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import Listener

from .settings import ListenerSettings

__all__ = ["build_listener", "served_chain", "ssl_context_factory"]

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); the ssl module passes verify flags through.
_NO_CHECK_TIME = 0x200000

#: Issuers looked for above the server's certificate, at most (OpenSSL's default depth is 100;
#: a server chain is two or three).
_MAX_ISSUERS = 10


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)  # names, and the signature with the issuer's key
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def served_chain(certificate: bytes, trust: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
    """The issuers OpenSSL would otherwise look up in *trust* on each handshake to send after
    the server's *certificate* (a PEM file's content), up to and including a self-signed root, as
    it does; ``None`` when the file already holds more than one certificate (OpenSSL then sends
    those as they are) or when there is no single such path (OpenSSL is left to it, as before)."""
    certs = x509.load_pem_x509_certificates(certificate)
    return _issuers(certs[0], trust) if len(certs) == 1 else None


def _issuers(cert: x509.Certificate, trust: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
    chain: list[x509.Certificate] = []
    while len(chain) <= _MAX_ISSUERS:
        if cert.issuer == cert.subject and _issued_by(cert, cert):
            return chain or None  # a root: the path ends here (a self-signed server certificate: nothing)
        issuers = {c for c in trust if c.subject == cert.issuer and _issued_by(cert, c)}
        if len(issuers) != 1:  # none (an issuer not in the bundle), or a choice OpenSSL would make
            return None
        cert = issuers.pop()
        chain.append(cert)
    return None


def _chain_file(certs: Sequence[x509.Certificate]) -> str | None:
    """*certs* in a temporary PEM file for the ssl module, which loads certificates only from a
    file (certificates only: the key is read from its own); ``None`` when none can be written."""
    try:
        fd, name = tempfile.mkstemp(prefix="authgw-chain-", suffix=".pem")
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    except OSError:
        Path(name).unlink(missing_ok=True)
        return None
    return name


def _load_certificate(context: ssl.SSLContext, settings: ListenerSettings, trust: Sequence[x509.Certificate],
                      password: str | None) -> None:
    """The server's certificate and key, with the chain :func:`served_chain` finds, from a file
    read once and removed; with no chain to add, or no temporary file to be had, from the
    operator's file as it is (OpenSSL builds the chain then, as before)."""
    path = str(settings.certificate)
    with open(path, "rb") as f:
        try:
            certs = x509.load_pem_x509_certificates(f.read())
        except ValueError:  # not PEM certificates: load_cert_chain says so below
            certs = []
    chain = _issuers(certs[0], trust) if len(certs) == 1 else None
    combined = _chain_file([certs[0], *chain]) if chain else None
    try:
        context.load_cert_chain(combined or path, str(settings.key), password=password)
    finally:
        if combined:
            Path(combined).unlink(missing_ok=True)


def ssl_context_factory(settings: ListenerSettings,
                        trust: Sequence[x509.Certificate]) -> Callable[[], ssl.SSLContext]:
    password = settings.key_password.reveal() if settings.key_password else None
    trust_pem = "".join(c.public_bytes(Encoding.PEM).decode() for c in trust)

    def factory() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion[settings.minimum_tls_version.replace(".", "_")]
        _load_certificate(context, settings, trust, password)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=trust_pem)
        if not settings.check_validity_in_handshake:
            context.verify_flags |= _NO_CHECK_TIME
        context.options |= ssl.OP_NO_RENEGOTIATION
        context.num_tickets = settings.session_tickets  # TLS 1.3
        if not settings.session_tickets:
            context.options |= ssl.OP_NO_TICKET  # nor RFC 5077 tickets in TLS 1.2
        return context

    return factory


def build_listener(name: str, settings: ListenerSettings, trust: Sequence[x509.Certificate]) -> Listener:
    """The listener record; its factory is called once here so that a bad certificate, key or
    password stops start-up with the plugin's name instead of failing in a worker. *trust*: the
    roots and intermediates the handshake trusts."""
    factory = ssl_context_factory(settings, trust)
    try:
        factory()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{name}.listener: cannot load {settings.certificate} / {settings.key}: {exc}") from None
    return Listener(name=f"{name}.tls", address=settings.address, ssl_context=factory)
