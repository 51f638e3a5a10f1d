"""``authgw link enroll TICKET_URL [--ca FILE]``: provision this connector from a ticket URL.

1. ``GET TICKET_URL`` over verified HTTPS (the system CAs, or ``--ca``): the ticket's
   connection, the connector id to put in the CSR, the link URL. A used, expired or unknown
   ticket stops here with the relay's message.
2. Generate a P-256 key (it never leaves this machine) and ``POST`` a CSR for ``CN=<id>``.
3. Check the answer (our key, our name, issued by the CA sent along), then store the
   enrolment in the state directory (see :mod:`.state`). When the certificate the relay
   presented on these connections is the relay CA's (the relay's default), the link will trust
   that CA alone (``pinned``); one from another CA (an operator's certificate) leaves the link
   trusting what verified enrolment.

``HTTPS_PROXY``/``NO_PROXY`` are honoured (urllib tunnels HTTPS with CONNECT; credentials in the
proxy URL become ``Proxy-Authorization``). Exit 0 on success, else 1 with one line on stderr.
The ticket URL is checked before any request, and no message shows it or its token: the token
is the credential that enrols (whoever sends a CSR with it first gets the certificate).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.logs import printable

from . import state

__all__ = ["EnrolError", "enroll"]

_MAX_ANSWER = 64 * 1024
#: Characters of the relay's words (an error's detail, its connector id, link URL) shown.
_MAX_WORDS = 200
_TIMEOUT = 15.0
#: Seconds one request of enrolment may take in all (connection, TLS, the whole answer).
_DEADLINE = 30.0
#: What the relay accepts as a ticket token (plugins/relay/endpoints.py, ``_token``).
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,100}")
#: A connection name as the relay takes it (plugins/relay/settings.py, ``connection``).
_CONNECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: Characters of a link URL (the relay's is ``wss://HOST[:PORT]/link``).
_MAX_LINK_URL = 2048
_BAD_URL = ("a ticket URL looks like https://relay.example/p/TOKEN (HTTPS only, no user name or password, a token of "
            "20-100 letters, digits, '-' and '_', nothing after it)")


class EnrolError(Exception):
    """Enrolment failed; the message is the one line the operator sees."""


def _words(text: object) -> str:
    """The relay's words as they may reach the operator's terminal: printable and cut. Printed
    raw, a refusal's detail set the terminal's title (OSC) and forged an "enrolled as
    connector" line (review of the link)."""
    return printable(text)[:_MAX_WORDS]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Enrolment follows no redirect: urllib's default handler followed a ``302`` from the
    relay's HTTPS to plain ``http://``, sending the ticket's CSR (and the token in the path) in
    cleartext (review of the link). The message names the status, not the ``Location``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise EnrolError(f"the relay redirected the enrolment (HTTP {code}); enrolment follows no redirect: "
                         "use the ticket URL as the relay printed it")


class _SeenCertificates(urllib.request.HTTPSHandler):
    """urllib's HTTPS (proxies included: the certificate is the one at the tunnel's end), noting
    the certificate each server presented, DER, in :attr:`seen`."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self.context = context
        self.seen: list[bytes] = []

    def https_open(self, req):
        seen = self.seen

        class Connection(http.client.HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                seen.append(self.sock.getpeercert(binary_form=True))

        return self.do_open(Connection, req, context=self.context)


def _call(url: str, handler: _SeenCertificates, body: dict | None = None) -> dict:
    """One request of enrolment, answered within :data:`_DEADLINE` seconds in all. urllib's
    timeout bounds each read, not the answer: a relay (or what answers in its place) sending a
    byte every few seconds held ``authgw link enroll`` for hours (review of the connector's side
    of the link). The request runs on a thread of its own, left behind when it is given up on
    (the command ends, and the thread with it)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["answer"] = _exchange(url, handler, body)
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="authgw-enrol", daemon=True)
    thread.start()
    thread.join(_DEADLINE)
    if thread.is_alive():
        raise EnrolError(f"the relay at {urlsplit(url).netloc.rpartition('@')[2]} did not answer within "
                         f"{_DEADLINE:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def _exchange(url: str, handler: _SeenCertificates, body: dict | None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Accept": "application/json", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(handler, _NoRedirects())
    try:
        with opener.open(request, timeout=_TIMEOUT) as response:
            answer = json.loads(response.read(_MAX_ANSWER))
        if not isinstance(answer, dict):  # a list or a string: `.get` raised, a traceback for the operator
            raise ValueError("not the JSON object it answers")
        return answer
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read(_MAX_ANSWER))
            detail = f"{problem['error']}: {problem['detail']}"
        except Exception:  # not our relay's JSON: say what HTTP said
            detail = f"HTTP {exc.code} {exc.reason}"
        raise EnrolError(f"the relay refused: {_words(detail)}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise EnrolError(f"cannot verify the relay's certificate ({reason.verify_message}); "
                             "pass the relay's CA with --ca FILE") from None
        raise EnrolError(f"cannot reach the relay at {urlsplit(url).netloc.rpartition('@')[2]}: "
                         f"{_words(reason)}") from None
    except http.client.HTTPException as exc:  # not an OSError: a truncated or malformed HTTP answer
        raise EnrolError(f"bad answer from the relay: {exc.__class__.__name__}") from None
    except (OSError, ValueError) as exc:
        raise EnrolError(f"bad answer from the relay: {_words(exc)}") from None
    except RecursionError:  # JSON nested deeper than json reads
        raise EnrolError("bad answer from the relay: not the JSON it answers") from None


def _check_ticket_url(url: str) -> None:
    """Refuse a ticket URL the relay would not take, before any request: a token (or URL) with a
    space or control character in it otherwise reaches http.client, whose error quotes it."""
    if not url.isascii() or not url.isprintable() or " " in url:
        raise EnrolError(_BAD_URL)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise EnrolError(_BAD_URL) from None
    token = parts.path.removeprefix("/p/")
    if (parts.scheme != "https" or not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment
            or token == parts.path or not _TOKEN.fullmatch(token)):
        raise EnrolError(_BAD_URL)


def _check_link_url(link_url: object) -> None:
    """Raise :class:`EnrolError` unless *link_url*, from the relay's answer, is a link URL the
    connector can dial: ``wss://HOST[:PORT]/PATH`` in printable ASCII, no user name or password,
    no query or fragment. Stored as sent before, a URL with control characters reached link.json
    and the log, one with a bracket left open raised a traceback here, and one with a port that
    is not a number, or no host, was stored and failed every dial and ``authgw check`` after
    (review of the connector's side of the link)."""
    bad = EnrolError(f"the relay's link URL '{_words(link_url)}' is not wss://HOST[:PORT]/PATH in printable ASCII "
                     "(no user name or password, query or fragment); nothing was written")
    if not isinstance(link_url, str) or not 0 < len(link_url) <= _MAX_LINK_URL or not link_url.isascii() \
            or not link_url.isprintable() or " " in link_url:
        raise bad
    try:
        parts = urlsplit(link_url)
        port = parts.port  # raises ValueError for a port that is not a number (or out of range)
    except ValueError:
        raise bad from None
    if parts.scheme != "wss" or not parts.hostname or port == 0 or "@" in parts.netloc or parts.query or parts.fragment:
        raise bad


def enroll(ticket_url: str, state_dir: Path, ca_file: Path | None = None) -> str:
    """Enrol; returns the success line. Raises :class:`EnrolError`, whose message never holds
    the ticket URL."""
    _check_ticket_url(ticket_url)
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        server_ca = ca_file.read_bytes() if ca_file else None
    except (OSError, ssl.SSLError) as exc:
        raise EnrolError(f"cannot read the CA file {ca_file}: {exc}") from None
    https = _SeenCertificates(context)
    info = _call(ticket_url, https)
    connector = info.get("connector")
    # A certificate's CN holds 1-64 characters: a longer id raised from the CSR builder, a
    # traceback (review of the connector's side of the link). The relay's ids are far shorter.
    if not isinstance(connector, str) or not 0 < len(connector) <= 64 or not connector.isprintable():
        raise EnrolError("the relay's ticket information names no connector (an id of 1-64 printable characters)")

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, connector)]))
           .sign(key, hashes.SHA256()))
    answer = _call(ticket_url, https, {"csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")})
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode("ascii"))
        relay_ca = x509.load_pem_x509_certificate(answer["ca"].encode("ascii"))
        link_url, connection = answer["link_url"], answer["connection"]
        cert.verify_directly_issued_by(relay_ca)
    except Exception as exc:
        raise EnrolError(f"the relay's answer is not a usable certificate: {exc.__class__.__name__}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise EnrolError("the relay returned a certificate for another key")
    # Exactly our name, as state.load and a renewal take it: a certificate naming another
    # connector beside ours was stored over a working enrolment, which was then called damaged.
    if [name.value for name in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] != [connector]:
        raise EnrolError("the relay returned a certificate for another name")
    # One that has ended would replace a working enrolment with one that cannot link.
    if cert.not_valid_after_utc <= datetime.now(timezone.utc):
        raise EnrolError("the relay returned a certificate that expired at "
                         f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; nothing was written")
    _check_link_url(link_url)
    # The relay's connection names are letters, digits, '.', '_' and '-' (plugins/relay/settings.py).
    # Any text was stored before: a newline or an escape sequence reached link.json, the log and
    # every later display of it, and an empty name left an enrolment `link status` called damaged.
    if not isinstance(connection, str) or not _CONNECTION.fullmatch(connection):
        raise EnrolError(f"the relay's connection name '{_words(connection)}' is not 1-63 letters, digits, '.', "
                         "'_' and '-' (starting with a letter or digit); nothing was written")
    pinned = bool(https.seen) and all(_issued_by(der, relay_ca) for der in https.seen)

    # Together: a re-enrolment killed after key.pem was replaced left the old key gone and a
    # certificate that no longer matched it, which `link status` called fine (review of the link).
    state.write_enrolment(state.directory(state_dir), [
        ("key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), True),
        ("cert.pem", cert.public_bytes(serialization.Encoding.PEM), False),
        ("relay-ca.pem", relay_ca.public_bytes(serialization.Encoding.PEM), False),
        ("server-ca.pem", server_ca, False),
        ("link.json", json.dumps({"link_url": link_url, "connection": connection, "connector": connector,
                                  "pinned": pinned}, indent=1).encode(), False),
    ])
    trust = "the relay CA, pinned" if pinned else \
        ("the CA of --ca" if server_ca is not None else "the system's CAs (not pinned: the relay's certificate "
                                                        "is not its CA's; --ca FILE narrows it)")
    return (f"enrolled as connector {_words(connector)} of connection {_words(connection)}; certificate valid "
            f"until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; link {_words(link_url)}, verified with {trust}")


def _issued_by(der: bytes, ca: x509.Certificate) -> bool:
    try:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - unreadable, another issuer, a bad signature: not the relay CA's
        return False
    return True
