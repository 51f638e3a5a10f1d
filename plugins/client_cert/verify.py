"""Path validation and usage checks for client certificates (RFC 5280 section 6).

The chain is built and its signatures checked by ``cryptography.x509.verification`` (a
``ClientVerifier`` over the configured roots, with the configured intermediates and any chain a
proxy forwarded as untrusted candidates). That verifier's default end-entity profile is the Web
PKI's (it demands a subjectAltName, which many client certificates lack), so the end-entity
policy here is permissive and this module checks what a client certificate needs itself, each
with its own reason code:

``cert.malformed``        not a parseable X.509 certificate
``cert.not_yet_valid``    notBefore is later than now + clock tolerance
``cert.expired``          notAfter is earlier than now - clock tolerance
``cert.untrusted``        no path to a configured root (unknown issuer, self-signed, bad
                          signature, an expired or unusable CA on the path), or a subject
                          emailAddress outside a CA's rfc822Name name constraints
``cert.wrong_usage``      no acceptable extendedKeyUsage, or keyUsage without digitalSignature
``cert.policy_missing``   a required certificate policy OID is not asserted by the leaf, or a CA
                          on the path below the trust anchor lists its policies without it
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

__all__ = ["CertError", "TrustStore", "UsagePolicy", "load_bundle", "parse_der"]

UTC = dt.timezone.utc
_CACHE_LIMIT = 4096


class CertError(Exception):
    """A certificate is refused. ``reason`` is the stable code; ``detail`` is for the log only."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_der(der: bytes) -> x509.Certificate:
    """Load one DER certificate and touch its extensions, so that a duplicate or undecodable
    extension surfaces here as ``cert.malformed`` and not later as an exception."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.extensions  # noqa: B018  (parses every extension)
        cert.subject, cert.issuer  # noqa: B018
        return cert
    except Exception as exc:  # cryptography raises ValueError and friends for bad DER
        raise CertError("cert.malformed", f"not an X.509 certificate ({exc.__class__.__name__})") from None


def load_bundle(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file; a file without one is an error (no silent empty trust)."""
    data = path.read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate bundle ({exc})") from None
    if not certs:
        raise ValueError(f"{path}: no certificate in it")
    return certs


def describe(cert: x509.Certificate) -> str:
    return (f"subject={cert.subject.rfc4514_string()!r} issuer={cert.issuer.rfc4514_string()!r} "
            f"serial={cert.serial_number:x}")


@dataclass(frozen=True, slots=True)
class UsagePolicy:
    """What the leaf itself must say about its use."""

    extended_key_usages: frozenset[str]
    require_digital_signature: bool
    required_policies: frozenset[str]
    clock_tolerance: float


def _not_a_ca(policy, cert: x509.Certificate, value: x509.BasicConstraints | None) -> None:
    # A CA certificate presented as the client's own (a root or intermediate from the bundle)
    # must not log anyone in: RFC 5280 4.2.1.9, an end entity does not assert cA.
    if value is not None and value.ca:
        raise ValueError("a CA certificate cannot be a client certificate")


_EE_POLICY = ExtensionPolicy.permit_all().may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _not_a_ca)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


def check_validity(cert: x509.Certificate, now: dt.datetime, tolerance: float) -> None:
    slack = dt.timedelta(seconds=tolerance)
    if now + slack < cert.not_valid_before_utc:
        raise CertError("cert.not_yet_valid", f"valid from {cert.not_valid_before_utc.isoformat()}")
    if now - slack > cert.not_valid_after_utc:
        raise CertError("cert.expired", f"expired at {cert.not_valid_after_utc.isoformat()}")


def _rfc822(subtrees: list[x509.GeneralName] | None) -> list[str]:
    return [name.value for name in subtrees or () if isinstance(name, x509.RFC822Name)]


def _mailbox(text: str) -> tuple[str, str]:
    """Local part and host, without regard to case, as the directory compares user names (a case
    variant must not slip past an exclusion); a trailing root label names the same host."""
    local, _, host = text.rpartition("@")
    return local.casefold(), host.casefold().removesuffix(".")


def _mailbox_within(address: tuple[str, str], constraint: str) -> bool:
    """RFC 5280 4.2.1.10: ``user@host`` is one mailbox, ``host`` every mailbox on that host only,
    ``.domain`` every mailbox on any host below the domain."""
    if "@" in constraint:
        return address == _mailbox(constraint)
    _, domain = _mailbox(constraint)
    if domain.startswith("."):
        return address[1].endswith(domain)
    return address[1] == domain


def check_email_constraints(path: Sequence[x509.Certificate]) -> None:
    """The leaf's subject emailAddress values (PKCS #9) against the rfc822Name constraints of every
    CA on the verified *path* (leaf first). RFC 5280 4.2.1.10 applies those constraints to the
    subject's emailAddress too; the verifier checks subjectAltName only, yet the ``subject_email``
    rule and the profile's email read the subject. Checked with or without a SAN, as OpenSSL does,
    since the mapping reads the subject either way."""
    emails = [str(a.value) for a in path[0].subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    if not emails:
        return
    for ca in path[1:]:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        permitted, excluded = _rfc822(constraints.permitted_subtrees), _rfc822(constraints.excluded_subtrees)
        if not permitted and not excluded:
            continue
        where = f"the rfc822Name constraints of {ca.subject.rfc4514_string()!r}"
        for email in emails:
            address = _mailbox(email)
            if not all(address) or not email.isascii():
                # A mailbox is ASCII (IA5String, as rfc822Name constraints are): one that is not
                # is compared with none. Case-folded, ``admin@groß.test`` was inside ``gross.test``
                # and a CA constrained to that domain named admin of another (review of the
                # client_cert plugin).
                raise CertError("cert.untrusted", f"subject emailAddress {email!r} is not an ASCII mailbox, "
                                                  f"so cannot be checked against {where}")
            if permitted and not any(_mailbox_within(address, c) for c in permitted):
                raise CertError("cert.untrusted", f"subject emailAddress {email!r} is outside {where}")
            if any(_mailbox_within(address, c) for c in excluded):
                raise CertError("cert.untrusted", f"subject emailAddress {email!r} is excluded by {where}")


def check_usage(cert: x509.Certificate, usage: UsagePolicy) -> None:
    if usage.extended_key_usages:
        try:
            ekus = {oid.dotted_string for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value}
        except x509.ExtensionNotFound:
            raise CertError("cert.wrong_usage", "no extendedKeyUsage extension") from None
        if not ekus & usage.extended_key_usages:
            raise CertError("cert.wrong_usage", f"extendedKeyUsage {sorted(ekus)} has none of "
                                                f"{sorted(usage.extended_key_usages)}")
    if usage.require_digital_signature:
        try:
            key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            key_usage = None  # RFC 5280 4.2.1.3: no extension, no restriction
        if key_usage is not None and not key_usage.digital_signature:
            raise CertError("cert.wrong_usage", "keyUsage lacks digitalSignature")
    if usage.required_policies:
        try:
            asserted = {p.policy_identifier.dotted_string
                        for p in cert.extensions.get_extension_for_class(x509.CertificatePolicies).value}
        except x509.ExtensionNotFound:
            asserted = set()
        missing = usage.required_policies - asserted
        if missing:
            raise CertError("cert.policy_missing", f"certificate policies {sorted(missing)} not asserted")


#: RFC 5280 4.2.1.4: a CA certificate asserting it is certified for every policy.
_ANY_POLICY = "2.5.29.32.0"


def check_path_policies(path: Sequence[x509.Certificate], required: frozenset[str]) -> None:
    """Every CA certificate on the verified *path* (leaf first) below the trust anchor that says
    which policies it is certified for (certificatePolicies) must name each ``required_policies``
    OID, or anyPolicy: the leaf's own assertion is what its issuing CA wrote, and a root's
    low-assurance issuing CA, certified for another policy only, wrote the high-assurance OID into
    a leaf that then logged in (stop 46 review; OpenSSL ``-policy OID -explicit_policy`` refuses
    it). A CA's anyPolicy counts unless a CA above it on the path carries inhibitAnyPolicy (any
    skipCerts, conservatively); policy mappings are not followed (a mapping CA must assert the
    required OID itself). A CA certificate without certificatePolicies constrains nothing, as
    Windows reads it (AD CS subordinate CAs commonly have none); RFC 5280 would refuse its leaves.
    The trust anchor (the path's last certificate) is not judged, as RFC 5280 section 6.1 does
    not process its extensions."""
    if not required:
        return
    inhibited = False
    for ca in reversed(path[1:-1]):  # from just below the trust anchor down to the leaf's issuer
        try:
            asserted = {p.policy_identifier.dotted_string
                        for p in ca.extensions.get_extension_for_class(x509.CertificatePolicies).value}
        except x509.ExtensionNotFound:
            asserted = None
        if asserted is not None and (_ANY_POLICY not in asserted or inhibited):
            missing = required - asserted
            if missing:
                raise CertError("cert.policy_missing", f"CA {ca.subject.rfc4514_string()!r} on the path is not "
                                                       f"certified for policies {sorted(missing)}")
        try:
            ca.extensions.get_extension_for_class(x509.InhibitAnyPolicy)
            inhibited = True
        except x509.ExtensionNotFound:
            pass


class TrustStore:
    """Roots, intermediates and a small cache of verified chains (thread-safe)."""

    def __init__(self, roots: Sequence[x509.Certificate], intermediates: Sequence[x509.Certificate],
                 usage: UsagePolicy, *, max_chain_depth: int = 6, cache_seconds: float = 60.0) -> None:
        if not roots:
            raise ValueError("no trust anchors")
        self.roots = list(roots)
        self.intermediates = list(intermediates)
        self.usage = usage
        self.max_chain_depth = max_chain_depth
        self.cache_seconds = cache_seconds
        self._store = Store(self.roots)
        self._cache: dict[bytes, tuple[float, list[x509.Certificate]]] = {}
        self._lock = threading.Lock()

    def _build(self, leaf: x509.Certificate, extra: list[x509.Certificate], at: dt.datetime) -> list[x509.Certificate]:
        verifier = (PolicyBuilder().store(self._store).time(at).max_chain_depth(self.max_chain_depth)
                    .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY).build_client_verifier())
        try:
            return list(verifier.verify(leaf, [*extra, *self.intermediates]).chain)
        except VerificationError as exc:
            text = str(exc).removeprefix("validation failed: ")
            if "candidates exhausted" in text:
                text = f"no path from issuer {leaf.issuer.rfc4514_string()!r} to a configured root"
            elif "not valid at validation time" in text:
                text = "a CA certificate on the path is expired or not yet valid: " + text
            raise CertError("cert.untrusted", text) from None

    def verify(self, chain_der: Sequence[bytes], now: dt.datetime | None = None) -> list[x509.Certificate]:
        """Check the presented chain (leaf first); return the verified path, leaf first, root
        last. Raises :class:`CertError`."""
        now = now or dt.datetime.now(UTC)
        if not chain_der:
            raise CertError("cert.malformed", "no certificate")
        key = hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in chain_der)).digest()
        path = self._cached(key, now)
        if path is not None:  # path and usage are facts of the certificates; time is not
            check_validity(path[0], now, self.usage.clock_tolerance)
            return path
        leaf = parse_der(chain_der[0])
        extra = [parse_der(der) for der in chain_der[1:]]
        check_validity(leaf, now, self.usage.clock_tolerance)
        # Validate at a time inside the leaf's window: the tolerance above already decided about
        # the leaf, and the CAs on the path must be valid at that same moment.
        at = min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)
        path = self._build(leaf, extra, at)
        check_email_constraints(path)
        check_usage(path[0], self.usage)
        check_path_policies(path, self.usage.required_policies)
        self._remember(key, path)
        return path

    def _cached(self, key: bytes, now: dt.datetime) -> list[x509.Certificate] | None:
        if not self.cache_seconds:
            return None
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        path = entry[1]
        for ca in path[1:]:  # a CA that expired since it was cached invalidates the entry
            if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
                return None
        return path

    def _remember(self, key: bytes, path: list[x509.Certificate]) -> None:
        if not self.cache_seconds:
            return
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                now = time.monotonic()
                stale = [k for k, (t, _) in self._cache.items() if t < now] or list(self._cache)[:_CACHE_LIMIT // 4]
                for old in stale:
                    del self._cache[old]
            self._cache[key] = (time.monotonic() + self.cache_seconds, path)

