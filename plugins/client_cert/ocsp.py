"""OCSP (RFC 6960) client: request with a nonce (RFC 8954), verify the answer, cache it.

An answer counts only when all of these hold:

* the response status is ``successful`` and it is signed by an authorised responder
  (RFC 6960 section 4.2.2.2): the issuing CA itself, a responder certificate issued directly by
  that CA with the ``id-kp-OCSPSigning`` EKU and valid now, or the locally configured responder
  certificate;
* a nonce it carries equals the one sent (RFC 8954 section 2.1; required only when
  ``ocsp_require_nonce``);
* it has a single response for exactly this issuer and serial, with ``thisUpdate`` not in the
  future and ``nextUpdate`` (or, without one, ``ocsp_max_age``) not passed (section 4.2.2.1).

Anything else is "unknown" (not "good"): the revocation policy then decides. That includes an
answer that cannot be judged at all: whoever is on the path to a plain-http responder can send
anything, and an exception while reading it (a certificate with a key type ``cryptography`` does
not know, an undecodable name) made every login of that CA an internal error, even under
soft-fail (review of the client_cert plugin). Such an answer is logged, rate-limited and
without a traceback, and counts as "unknown", as an unreachable responder does. Only until its
signature is checked, though: a signed answer is the CA's word, and one that cannot be read
(a "revoked" with a reason code ``cryptography`` does not know) is taken as revoked, never as
unknown, which soft-fail lets in (:meth:`OcspClient.judge`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, SignatureAlgorithmOID

from gateway.logs import RateLimitedWarning, printable
from gateway.settings import shown_url

from .fetch import Backoff, FetchError, fetch
from .settings import RevocationSettings
from .status import Status, Verdict, later_than, plus_seconds

__all__ = ["OcspClient", "responder_urls"]

UTC = dt.timezone.utc
_MAX_RESPONSE = 256 * 1024
_CACHE_LIMIT = 8192


def responder_urls(cert: x509.Certificate) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [d.access_location.value for d in aia
            if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)
            and d.access_location.value.lower().startswith(("http://", "https://"))]


def key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING: the ResponderID ``byKey`` (RFC 6960 4.2.1)."""
    digest = hashes.Hash(hashes.SHA1())
    digest.update(key_hash_input(cert))
    return digest.finalize()


def verify_signature(public_key, signature: bytes, data: bytes, algorithm, signature_oid) -> None:
    """Raise InvalidSignature (or TypeError for an unsupported key) unless *signature* is good."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if signature_oid == SignatureAlgorithmOID.RSASSA_PSS:
            pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
        else:
            pad = padding.PKCS1v15()
        public_key.verify(signature, data, pad, algorithm)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        public_key.verify(signature, data)
    elif isinstance(public_key, dsa.DSAPublicKey):
        public_key.verify(signature, data, algorithm)
    else:
        raise TypeError(f"unsupported responder key {type(public_key).__name__}")


class OcspClient:
    def __init__(self, settings: RevocationSettings, log: logging.Logger, tolerance: float,
                 responder_cert: x509.Certificate | None = None) -> None:
        self.settings = settings
        self.log = log
        self.tolerance = dt.timedelta(seconds=tolerance)
        self.responder_cert = responder_cert
        self.backoff = Backoff(settings.retry_after_failure)
        # An unreadable answer is the responder's (or the path's) doing, once per login: at most
        # one warning a minute, or a forger fills the log.
        self._warn_unreadable = RateLimitedWarning(log)
        self._cache: dict[tuple[bytes, int], tuple[float, Verdict]] = {}
        self._lock = threading.Lock()

    def urls(self, cert: x509.Certificate) -> list[str]:
        if self.settings.ocsp_responder:
            return [self.settings.ocsp_responder]
        return responder_urls(cert) if self.settings.ocsp else []

    # -- status ------------------------------------------------------------------------------------

    def status(self, cert: x509.Certificate, issuer: x509.Certificate, deadline: float) -> Verdict:
        urls = self.urls(cert)
        if not urls:
            return Verdict(Status.NONE, "no OCSP responder for this certificate")
        key = (key_hash(issuer), cert.serial_number)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        problems = []
        for url in urls:
            blocked = self.backoff.blocked(url)
            if blocked:
                problems.append(f"recent OCSP failure: {blocked}")
                continue
            timeout = min(self.settings.timeout, deadline - time.monotonic() - 0.1)
            if timeout <= 0.05:
                problems.append(f"{shown_url(url)}: no time left to ask")
                break
            try:
                verdict, expires = self.ask(url, cert, issuer, timeout)
            except FetchError as exc:
                self.backoff.failed(url, str(exc))
                self.log.warning("OCSP request failed: %s", exc)
                problems.append(str(exc))
                continue
            self.backoff.succeeded(url)
            if verdict.status in (Status.GOOD, Status.REVOKED):
                self._remember(key, verdict, expires)
                return verdict
            problems.append(f"{shown_url(url)}: {verdict.detail}")
        return Verdict(Status.UNKNOWN, "; ".join(problems))

    def _remember(self, key: tuple[bytes, int], verdict: Verdict, expires: dt.datetime | None) -> None:
        seconds = self.settings.ocsp_cache_seconds
        if expires is not None:
            seconds = min(seconds, (expires - dt.datetime.now(UTC)).total_seconds())
        if seconds <= 0:
            return
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                now = time.monotonic()
                stale = [k for k, (t, _) in self._cache.items() if t <= now] or list(self._cache)[:_CACHE_LIMIT // 4]
                for key_ in stale:
                    del self._cache[key_]
            self._cache[key] = (time.monotonic() + seconds, verdict)

    # -- one request -------------------------------------------------------------------------------

    def ask(self, url: str, cert: x509.Certificate, issuer: x509.Certificate,
            timeout: float) -> tuple[Verdict, dt.datetime | None]:
        """POST one request (RFC 6960 appendix A.1); the verdict and when it stops being fresh."""
        builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
        nonce = os.urandom(32) if self.settings.ocsp_nonce else None
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        body = builder.build().public_bytes(serialization.Encoding.DER)
        data = fetch(url, timeout=timeout, max_bytes=_MAX_RESPONSE, body=body,
                     content_type="application/ocsp-request", accept="application/ocsp-response")
        try:
            response = ocsp.load_der_ocsp_response(data)
        except ValueError:
            return Verdict(Status.UNKNOWN, "the answer is not an OCSP response"), None
        try:
            return self.judge(response, cert, issuer, nonce)
        except _Unreadable as unreadable:  # before its signature: anyone's bytes; see the module docstring
            exc = unreadable.__cause__
            what = f"{type(exc).__name__}: {printable(exc)[:200]}"
            self._warn_unreadable("ocsp.unreadable", "OCSP answer from %s could not be judged (%s); taken as "
                                  "unknown", shown_url(url), what)
            return Verdict(Status.UNKNOWN, f"the answer could not be judged ({what})"), None

    def judge(self, response: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate,
              nonce: bytes | None) -> tuple[Verdict, dt.datetime | None]:
        """The verdict of *response*. Until its signature is checked it is anyone's bytes: one
        that cannot be read raises :class:`_Unreadable` ("unknown", the policy decides). Once an
        authorised responder's signature holds, it is the CA's word, and may say revoked: one
        that cannot be read is taken as revoked. Taken as unknown, a correctly signed "revoked"
        with a reason code ``cryptography`` does not read (7) let the certificate in under
        soft-fail (review of this stop's diff)."""
        try:
            if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                return Verdict(Status.UNKNOWN, f"responder answered {response.response_status.name.lower()}"), None
            problem = self._check_signer(response, issuer)
        except Exception as exc:
            raise _Unreadable() from exc
        if problem:
            return Verdict(Status.UNKNOWN, problem), None
        try:
            return self._signed_verdict(response, cert, issuer, nonce)
        except Exception as exc:
            return Verdict(Status.REVOKED, f"OCSP: a signed answer that cannot be read ({type(exc).__name__}): "
                                           "taken as revoked"), None

    def _signed_verdict(self, response: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate,
                        nonce: bytes | None) -> tuple[Verdict, dt.datetime | None]:
        """What *response*, signed by an authorised responder, says of *cert*."""
        try:
            echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            echoed = None
        if echoed is not None and nonce is not None and echoed != nonce:
            return Verdict(Status.UNKNOWN, "the response carries another request's nonce (replay?)"), None
        if echoed is None and nonce is not None and self.settings.ocsp_require_nonce:
            return Verdict(Status.UNKNOWN, "the response carries no nonce"), None
        now = dt.datetime.now(UTC)
        for single in response.responses:
            if single.serial_number != cert.serial_number or not _same_issuer(single, issuer):
                continue
            # No date plus seconds is compared: a nextUpdate in year 9999 overflowed (review of time).
            if later_than(single.this_update_utc, now, self.tolerance.total_seconds()):
                return Verdict(Status.UNKNOWN, "the response's thisUpdate is in the future"), None
            next_update = single.next_update_utc
            if next_update is None:
                next_update = plus_seconds(single.this_update_utc, self.settings.ocsp_max_age)
            if later_than(now, next_update, self.tolerance.total_seconds()):
                return Verdict(Status.UNKNOWN, f"the response is too old (fresh until {next_update.isoformat()})"), None
            if single.certificate_status == ocsp.OCSPCertStatus.GOOD:
                return Verdict(Status.GOOD, "OCSP: good"), next_update
            if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                try:
                    reason = single.revocation_reason.name if single.revocation_reason else "unspecified"
                    when = single.revocation_time_utc.isoformat()
                except Exception:  # noqa: BLE001 - a reason code cryptography does not know: revoked all the same
                    return Verdict(Status.REVOKED, "OCSP: revoked (its reason or time cannot be read)"), next_update
                return Verdict(Status.REVOKED, f"OCSP: revoked at {when} ({reason})"), next_update
            return Verdict(Status.UNKNOWN, "the responder does not know this certificate"), None
        return Verdict(Status.UNKNOWN, "the response has no answer for this certificate"), None

    def _check_signer(self, response: ocsp.OCSPResponse, issuer: x509.Certificate) -> str | None:
        """None when an authorised responder signed *response*, else what is wrong."""
        candidates: list[x509.Certificate] = [issuer, *response.certificates]
        if self.responder_cert is not None:
            candidates.append(self.responder_cert)
        by_name, by_key = response.responder_name, response.responder_key_hash
        for signer in candidates:
            if not _is_responder(signer, by_name, by_key):
                continue
            if signer is not issuer and signer is not self.responder_cert:
                problem = self._delegate_problem(signer, issuer)
                if problem:
                    return problem
            try:
                verify_signature(signer.public_key(), response.signature, response.tbs_response_bytes,
                                 response.signature_hash_algorithm, response.signature_algorithm_oid)
            except Exception:
                return "the response signature does not verify"
            return None
        return "the response is not signed by the CA or a responder it authorised"

    def _delegate_problem(self, signer: x509.Certificate, issuer: x509.Certificate) -> str | None:
        try:
            signer.verify_directly_issued_by(issuer)
        except Exception:
            return "the responder certificate is not issued by the certificate's CA"
        try:
            ekus = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            ekus = []
        if ExtendedKeyUsageOID.OCSP_SIGNING not in ekus:
            return "the responder certificate lacks the OCSPSigning EKU"
        now = dt.datetime.now(UTC)
        slack = self.tolerance.total_seconds()  # notAfter 99991231235959Z (RFC 5280 4.1.2.5) + slack overflowed
        if later_than(signer.not_valid_before_utc, now, slack) or later_than(now, signer.not_valid_after_utc, slack):
            return "the responder certificate is not valid now"
        return None

    # -- self-test ---------------------------------------------------------------------------------

    def probe(self, url: str, issuer: x509.Certificate) -> str:
        """Ask *url* about a serial that does not exist; any well-formed OCSP answer proves the
        responder reachable. Returns what it said; raises FetchError."""
        name_hash = hashes.Hash(hashes.SHA1())
        name_hash.update(issuer.subject.public_bytes())
        request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            name_hash.finalize(), key_hash(issuer), 1, hashes.SHA1()).build()
        data = fetch(url, timeout=self.settings.timeout, max_bytes=_MAX_RESPONSE,
                     body=request.public_bytes(serialization.Encoding.DER), content_type="application/ocsp-request")
        try:
            response = ocsp.load_der_ocsp_response(data)
        except ValueError:
            raise FetchError(f"{shown_url(url)}: the answer is not an OCSP response") from None
        return response.response_status.name.lower()


class _Unreadable(Exception):
    """An OCSP answer that could not be read before its signature was checked (the cause)."""


def _is_responder(signer: x509.Certificate, by_name: x509.Name | None, by_key: bytes | None) -> bool:
    """Whether *signer* is the certificate the ResponderID names (RFC 6960 4.2.2.3). The
    certificates a response carries are read here before any signature is checked, so one that
    cannot be read (a public-key algorithm ``cryptography`` does not support raises
    UnsupportedAlgorithm, an undecodable subject ValueError) is nobody's signer, not an error
    that fails the login."""
    try:
        if by_name is not None:
            return signer.subject == by_name
        return by_key == key_hash(signer)
    except Exception:
        return False


def _same_issuer(single: ocsp.OCSPSingleResponse, issuer: x509.Certificate) -> bool:
    algorithm = single.hash_algorithm
    name_hash = hashes.Hash(algorithm)
    name_hash.update(issuer.subject.public_bytes())
    spki = hashes.Hash(algorithm)
    spki.update(key_hash_input(issuer))
    return single.issuer_name_hash == name_hash.finalize() and single.issuer_key_hash == spki.finalize()


def key_hash_input(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents (what CertID.issuerKeyHash hashes, RFC 6960 4.1.1)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _bit_string_of_spki(spki)


def _bit_string_of_spki(spki: bytes) -> bytes:
    """Parse ``SEQUENCE { AlgorithmIdentifier, BIT STRING }`` just enough to return the key bits."""
    def header(data: bytes, pos: int) -> tuple[int, int, int]:
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[pos:pos + count], "big")
            pos += count
        return tag, length, pos

    _, _, pos = header(spki, 0)          # outer SEQUENCE
    _, alg_len, alg_pos = header(spki, pos)  # AlgorithmIdentifier
    tag, bits_len, bits_pos = header(spki, alg_pos + alg_len)
    if tag != 0x03:
        raise ValueError("SubjectPublicKeyInfo without a BIT STRING")
    return spki[bits_pos + 1:bits_pos + bits_len]  # skip the unused-bits octet

