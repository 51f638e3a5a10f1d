"""The directory connector's self-tests, in the order an operator reads them.

1. ``ldap.tcp[host:port]``   a TCP connection to each server
2. ``ldap.tls[host:port]``   the TLS handshake (LDAPS or StartTLS) with verification, and the
                             certificate's expiry
3. ``ldap.bind``             the service account binds (prerequisite of 4 and 5)
4. ``ldap.search``           the service account finds users under ``base_dn`` and can read the
                             mapped attributes (and cannot read password hashes)
5. ``ldap.login[user]``      optional: a full login of ``test_login.username``

Each failure carries a hint of what to check. Tests use their own connections, never the pool's.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from typing import TYPE_CHECKING

from gateway import CheckResult, Outcome, SelfTest
from gateway.plugins.ldap.adcodes import parse_data_code
from gateway.plugins.ldap.link import LinkBroken, ServerTrouble
from gateway.plugins.ldap.pool import SERVICE, DirectoryUnavailable, Server, ServiceBindFailed

if TYPE_CHECKING:
    from gateway.plugins.ldap import LdapPlugin

__all__ = ["selftests"]

#: Warn when a server certificate expires within this many days.
EXPIRY_WARNING_DAYS = 30

# The ExtendedRequest for StartTLS (RFC 4511 section 4.14.1), message ID 1, BER encoded:
# SEQUENCE { INTEGER 1, [APPLICATION 23] { [0] "1.3.6.1.4.1.1466.20037" } }
_STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"
_STARTTLS_REQUEST = (b"\x30" + bytes([5 + len(_STARTTLS_OID)]) + b"\x02\x01\x01"
                     + b"\x77" + bytes([2 + len(_STARTTLS_OID)]) + b"\x80" + bytes([len(_STARTTLS_OID)])
                     + _STARTTLS_OID)

_TCP_HINT = ("check the host name and port in ldap.servers (LDAPS is usually 636, LDAP 389), that the "
             "directory runs, and that no firewall drops the connection from this host")
_VERIFY_HINTS = {
    10: "the server certificate has expired: renew it on the directory server",
    20: "the certificate's issuer is not trusted: set ldap.ca_file to the PEM bundle of the CA "
        "that issued it (for AD: the enterprise root CA)",
    19: "the server sends a self-signed certificate: put it (or its CA) into ldap.ca_file",
    21: "the chain is incomplete: make the server send its intermediates, or add them to ldap.ca_file",
    62: "the certificate does not name this host: use a host name from its subjectAltName in "
        "ldap.servers (IP addresses are not accepted; use DNS names)",
}


def selftests(plugin: LdapPlugin) -> list[SelfTest]:
    name = plugin.name
    tests: list[SelfTest] = []
    for server in plugin.pool.servers:
        tests.append(SelfTest(f"{name}.tcp[{server.name}]", lambda s=server: _tcp(plugin, s)))
        tests.append(SelfTest(f"{name}.tls[{server.name}]", lambda s=server: _tls(plugin, s)))
    tests.append(SelfTest(f"{name}.bind", lambda: _bind(plugin), prerequisite=True))
    tests.append(SelfTest(f"{name}.search", lambda: _search(plugin), prerequisite=True))
    if plugin.settings.test_login is not None:
        tests.append(SelfTest(f"{name}.login[{plugin.settings.test_login.username}]", lambda: _login(plugin)))
    return tests


def _tcp(plugin: LdapPlugin, server: Server) -> CheckResult:
    started = time.monotonic()
    try:
        with socket.create_connection((server.host, server.port), timeout=plugin.settings.connect_timeout):
            pass
    except OSError as exc:
        return CheckResult.fail(f"{server.name}: {exc.__class__.__name__}: {exc}", _TCP_HINT)
    return CheckResult.ok(f"{server.name} accepted a connection in {(time.monotonic() - started) * 1000:.0f} ms")


def _tls(plugin: LdapPlugin, server: Server) -> CheckResult:
    settings = plugin.settings
    if not server.use_ssl and not settings.start_tls:
        return CheckResult.warn(f"{server.url} is plaintext (insecure: true): passwords cross the network readable",
                                "use ldaps:// or start_tls: true with a certificate the gateway can verify")
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    try:
        with socket.create_connection((server.host, server.port), timeout=settings.connect_timeout) as raw:
            raw.settimeout(settings.receive_timeout)
            if not server.use_ssl:
                problem = _start_tls(raw)
                if problem:
                    return CheckResult.fail(f"{server.name}: StartTLS refused: {problem}",
                                            "the server must offer StartTLS (OpenLDAP: TLSCertificateFile; "
                                            "AD: a Domain Controller certificate); or use ldaps://")
            with context.wrap_socket(raw, server_hostname=server.host) as tls:
                der = tls.getpeercert(binary_form=True)
                version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        hint = _VERIFY_HINTS.get(exc.verify_code, "check ldap.ca_file and the server's certificate chain")
        return CheckResult.fail(f"{server.name}: certificate not accepted: {exc.verify_message}", hint)
    except ssl.SSLError as exc:
        return CheckResult.fail(f"{server.name}: TLS handshake failed: {exc}",
                                "is this port TLS (ldaps://) or plain (ldap:// with start_tls)?")
    except OSError as exc:
        return CheckResult.fail(f"{server.name}: {exc.__class__.__name__}: {exc}", _TCP_HINT)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    expires = cert.not_valid_after_utc
    days = (expires - dt.datetime.now(dt.timezone.utc)).days
    detail = (f"{server.name}: {version}, certificate {cert.subject.rfc4514_string()} issued by "
              f"{cert.issuer.rfc4514_string()}, expires {expires:%Y-%m-%d} ({days} days)")
    if days < EXPIRY_WARNING_DAYS:
        return CheckResult.warn(detail, "renew the directory's certificate before it expires; logins stop then")
    return CheckResult.ok(detail)


def _start_tls(sock: socket.socket) -> str:
    """Send the StartTLS request; '' when the server said success, else what it said."""
    sock.sendall(_STARTTLS_REQUEST)
    data = b""
    while len(data) < 2 or len(data) < _ber_length(data):
        chunk = sock.recv(4096)
        if not chunk:
            return "the server closed the connection"
        data += chunk
    # LDAPMessage SEQUENCE { messageID, [APPLICATION 24] ExtendedResponse { resultCode ENUMERATED ... } }
    marker = data.find(b"\x78")
    if marker < 0:
        return "unexpected answer"
    op = data[marker:]
    header = 2 if op[1] < 0x80 else 2 + (op[1] & 0x7F)
    if op[header] != 0x0A:
        return "unexpected answer"
    code = op[header + 2]
    return "" if code == 0 else f"result code {code}"


def _ber_length(data: bytes) -> int:
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if len(data) < 2 + count:
        return 2 + count + 1
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


def _bind(plugin: LdapPlugin) -> CheckResult:
    settings = plugin.settings
    if settings.bind_dn is None:
        return CheckResult.ok("no service account (direct_bind); nothing to bind")
    deadline = time.monotonic() + settings.connect_timeout + settings.receive_timeout
    problems = []
    for server in plugin.pool.servers:
        try:
            link = plugin.pool.open(server, SERVICE, deadline)
        except ServiceBindFailed as exc:
            ad = parse_data_code(exc.message)
            extra = f" (AD: {ad.meaning})" if ad else ""
            return CheckResult.fail(f"{server.name}: {exc}{extra}",
                                    "check ldap.bind_dn (the full DN, or user@domain for AD) and the secret "
                                    "in ldap.bind_password; is the service account locked, disabled or expired?")
        except (LinkBroken, ServerTrouble) as exc:
            problems.append(f"{server.name}: {exc}")
            deadline = time.monotonic() + settings.connect_timeout + settings.receive_timeout
            continue
        link.close()
        return CheckResult.ok(f"bound as {settings.bind_dn} on {server.name}"
                              + (f" (others failed: {'; '.join(problems)})" if problems else ""))
    return CheckResult.fail("no server accepted a connection: " + "; ".join(problems),
                            "see the tcp and tls tests above; for TLS failures check ldap.ca_file")


def _search(plugin: LdapPlugin) -> CheckResult:
    settings, resolved = plugin.settings, plugin.resolved
    # Any user: the filter with a presence-like wildcard in place of the name (operator text,
    # not user input, so it is not escaped).
    query = resolved.user_filter.replace("{username}", "*")
    attributes = [*resolved.user_attributes, "userPassword", "unicodePwd"]
    deadline = time.monotonic() + settings.connect_timeout + 2 * settings.receive_timeout

    def probe(link):
        return link.search(settings.base_dn, query, attributes, scope=settings.scope, size_limit=20)

    try:
        result, entries, _ = plugin.pool.call(SERVICE, probe, deadline)
    except DirectoryUnavailable as exc:
        return CheckResult.fail(f"search failed: {exc}", "see the bind test; check connectivity")
    if result.code == 32:
        return CheckResult.fail(f"base DN {settings.base_dn} does not exist ({result.message})",
                                "check ldap.base_dn (for AD: DC=corp,DC=example,DC=com)")
    if result.code not in (0, 4):
        return CheckResult.fail(f"search under {settings.base_dn} answered {result.code}: {result.message}",
                                "check the service account's read rights on base_dn and ldap.user_filter")
    if not entries:
        return CheckResult.fail(f"no user matches {query} under {settings.base_dn}",
                                "check ldap.base_dn, the preset or ldap.user_filter, and that the service "
                                "account may search there (AD: it needs to be a domain user)")
    missing = [a for a in resolved.user_attributes if a != "memberOf" and not any(e.get(a) for e in entries)]
    hashes = [e.dn for e in entries if e.get("userPassword") or e.get("unicodePwd")]
    detail = f"{len(entries)}{'+' if result.code == 4 else ''} users found under {settings.base_dn}"
    if hashes:
        return CheckResult.warn(f"{detail}; the service account can READ password hashes (e.g. {hashes[0]})",
                                "restrict the service account: OpenLDAP `access to attrs=userPassword by * auth`")
    if missing:
        return CheckResult.warn(f"{detail}; none of them has readable {', '.join(missing)}",
                                "check the attribute names in ldap.attributes and the service account's read "
                                "rights on them")
    return CheckResult.ok(f"{detail}; mapped attributes readable: {', '.join(resolved.user_attributes)}")


def _login(plugin: LdapPlugin) -> CheckResult:
    test = plugin.settings.test_login
    assert test is not None
    deadline = time.monotonic() + plugin.context_deadline
    try:
        verdict = plugin.directory.login(test.username, test.password.reveal(), deadline)
    except DirectoryUnavailable as exc:
        return CheckResult.fail(f"the directory did not answer: {exc}", "see the tests above")
    if verdict.outcome is Outcome.SUCCESS and verdict.identity is not None:
        ident = verdict.identity
        return CheckResult.ok(f"{test.username} logged in as subject {ident.subject}, "
                              f"name {ident.display_name!r}, email {ident.email!r}, {len(ident.groups)} groups")
    hints = {
        "ldap.user_not_found": "the test user is not found: check ldap.user_filter and base_dn",
        "ldap.ambiguous_user": "several entries match the test user: make ldap.user_filter stricter",
        "ldap.invalid_password": "the password in ldap.test_login.password is wrong (or the account changed)",
    }
    return CheckResult.fail(f"{test.username}: {verdict.outcome.value} ({verdict.reason})",
                            hints.get(verdict.reason, "see docs/plugins/ldap.md, reason codes"))
