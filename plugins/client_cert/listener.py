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
"""

from __future__ import annotations

import ssl
from typing import Callable

from gateway import Listener

from .settings import ListenerSettings

__all__ = ["build_listener", "ssl_context_factory"]

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); the ssl module passes verify flags through.
_NO_CHECK_TIME = 0x200000


def ssl_context_factory(settings: ListenerSettings, trust_pem: str) -> Callable[[], ssl.SSLContext]:
    password = settings.key_password.reveal() if settings.key_password else None

    def factory() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion[settings.minimum_tls_version.replace(".", "_")]
        context.load_cert_chain(str(settings.certificate), str(settings.key), password=password)
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


def build_listener(name: str, settings: ListenerSettings, trust_pem: str) -> Listener:
    """The listener record; its factory is called once here so that a bad certificate, key or
    password stops start-up with the plugin's name instead of failing in a worker."""
    factory = ssl_context_factory(settings, trust_pem)
    try:
        factory()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{name}.listener: cannot load {settings.certificate} / {settings.key}: {exc}") from None
    return Listener(name=f"{name}.tls", address=settings.address, ssl_context=factory)
