"""Self-tests for ``authgw check``: trust material, expiry, CRL sources, OCSP responders.

* ``client_cert.ca_bundle`` / ``client_cert.intermediates``: the files load; subjects and expiry
  dates are listed; an expired CA fails, one expiring within 30 days warns.
* ``client_cert.listener_certificate``: the server certificate and key load; expiry as above.
* ``client_cert.crl[SOURCE]``: each CRL file and configured URL (and, with ``check: chain``,
  the distribution points of the intermediates) is readable or reachable, is signed by a
  configured CA, and is fresh (before ``nextUpdate`` + ``crl_grace``).
* ``client_cert.ocsp[URL]``: the configured responder answers a well-formed OCSP response.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Callable, Sequence

from cryptography import x509

from gateway import CheckResult, SelfTest

from .crl import LoadedCrl, RefusedCrl, distribution_points, parse_crl
from .fetch import FetchError

if TYPE_CHECKING:
    from . import ClientCertPlugin

__all__ = ["selftests"]

UTC = dt.timezone.utc
EXPIRY_WARNING = dt.timedelta(days=30)


def _expiry(certs: Sequence[x509.Certificate], what: str, hint: str) -> CheckResult:
    now = dt.datetime.now(UTC)
    lines, expired, soon = [], [], []
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        lines.append(f"{subject} (until {cert.not_valid_after_utc:%Y-%m-%d})")
        if cert.not_valid_after_utc < now or cert.not_valid_before_utc > now:
            expired.append(subject)
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            soon.append(f"{subject} expires {cert.not_valid_after_utc:%Y-%m-%d}")
    detail = f"{what}: {len(certs)} certificate(s): " + "; ".join(lines)
    if expired:
        return CheckResult.fail(detail, f"not valid now: {', '.join(expired)}; {hint}")
    if soon:
        return CheckResult.warn(detail, f"{'; '.join(soon)} (within 30 days); {hint}")
    return CheckResult.ok(detail)


def _not_ca(certs: Sequence[x509.Certificate]) -> list[str]:
    bad = []
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            bad.append(cert.subject.rfc4514_string())
    return bad


def _bundle_test(certs: Sequence[x509.Certificate], what: str) -> Callable[[], CheckResult]:
    def run() -> CheckResult:
        bad = _not_ca(certs)
        if bad:
            return CheckResult.fail(f"{what}: not CA certificates: {', '.join(bad)}",
                                    "the bundle must hold CA certificates (basicConstraints cA=true) only")
        return _expiry(certs, what, "renew the CA and distribute the new bundle")
    return run


def _crl_result(plugin: ClientCertPlugin, loaded: LoadedCrl, source: str) -> CheckResult:
    settings = plugin.settings.revocation
    cas = [*plugin.trust.roots, *plugin.trust.intermediates]
    signer = next((ca for ca in cas if ca.subject == loaded.crl.issuer
                   and loaded.crl.is_signature_valid(ca.public_key())), None)
    next_update = loaded.crl.next_update_utc
    until = f"nextUpdate {next_update:%Y-%m-%d %H:%M}Z" if next_update else "no nextUpdate"
    detail = (f"{source}: issuer {loaded.crl.issuer.rfc4514_string()}, {len(loaded.serials)} revoked, "
              f"thisUpdate {loaded.crl.last_update_utc:%Y-%m-%d %H:%M}Z, {until}")
    if signer is None:
        return CheckResult.fail(detail, "no configured CA signed this CRL: check ca_bundle/intermediates")
    if not loaded.usable:
        return CheckResult.warn(detail, "delta and indirect CRLs are not supported; this one is ignored")
    too_old = loaded.too_old(dt.datetime.now(UTC), settings, plugin.settings.clock_tolerance)
    if too_old:
        hint = "the CA has not published a new CRL; under hard-fail every certificate it covers is denied"
        return CheckResult.fail(f"{detail}: {too_old}", hint)
    return CheckResult.ok(detail)


def _crl_file_test(plugin: ClientCertPlugin, path) -> Callable[[], CheckResult]:
    def run() -> CheckResult:
        try:
            loaded = LoadedCrl.make(parse_crl(path.read_bytes()), str(path), plugin.log)
        except (OSError, ValueError) as exc:
            return CheckResult.fail(f"{path}: {exc}", "check revocation.crl_files and the file's format (PEM or DER)")
        return _crl_result(plugin, loaded, str(path))
    return run


def _crl_url_test(plugin: ClientCertPlugin, url: str,
                  issuers: Sequence[x509.Certificate] = ()) -> Callable[[], CheckResult]:
    def run() -> CheckResult:
        try:
            loaded = plugin.revocation.crls.fetch_now(url, issuers)
        except RefusedCrl as exc:
            return CheckResult.fail(str(exc), "the URL answered a CRL that failed its checks: is it the URL of a "
                                              "CA in ca_bundle or intermediates, and is that CA's CRL current?")
        except FetchError as exc:
            return CheckResult.fail(str(exc), "is the CRL URL reachable from this host (firewall, proxy)?")
        return _crl_result(plugin, loaded, url)
    return run


def _ocsp_test(plugin: ClientCertPlugin, url: str) -> Callable[[], CheckResult]:
    def run() -> CheckResult:
        issuer = (plugin.trust.intermediates or plugin.trust.roots)[0]
        try:
            status = plugin.revocation.ocsp.probe(url, issuer)
        except FetchError as exc:
            return CheckResult.fail(str(exc), "is the OCSP responder reachable from this host (firewall, proxy)?")
        return CheckResult.ok(f"{url}: answers OCSP (asked about a made-up serial: {status})")
    return run


def selftests(plugin: ClientCertPlugin) -> list[SelfTest]:
    name = plugin.name
    tests = [SelfTest(f"{name}.ca_bundle", _bundle_test(plugin.trust.roots, str(plugin.settings.ca_bundle)),
                      prerequisite=True)]
    if plugin.trust.intermediates:
        tests.append(SelfTest(f"{name}.intermediates",
                              _bundle_test(plugin.trust.intermediates, str(plugin.settings.intermediates))))
    if plugin.listener is not None:
        tests.append(SelfTest(f"{name}.listener_certificate", lambda: _listener(plugin)))
    settings = plugin.settings.revocation
    if settings.policy == "off":
        tests.append(SelfTest(f"{name}.revocation", lambda: CheckResult.warn(
            "revocation checking is off", "a revoked certificate logs in; set revocation: soft-fail or hard-fail")))
        return tests
    for path in settings.crl_files:
        tests.append(SelfTest(f"{name}.crl[{path}]", _crl_file_test(plugin, path)))
    # Each URL with the CAs it serves besides the configured ones (which a configured URL serves):
    # an intermediate's distribution point serves the CA that issued it. Fetched without it, the
    # root's own CRL was refused as "not a CA this URL serves", a failure on every `check: chain`
    # set-up whose intermediates name a distribution point (review of the certificate plugin).
    urls: dict[str, list[x509.Certificate]] = {url: [] for url in settings.crl_urls}
    if settings.check == "chain" and settings.crl_distribution_points:
        cas = [*plugin.trust.roots, *plugin.trust.intermediates]
        for ca in plugin.trust.intermediates:
            issuers = [issuer for issuer in cas if _issued_by(ca, issuer)]
            for url in distribution_points(ca):
                urls.setdefault(url, []).extend(issuers)
    for url, issuers in urls.items():
        tests.append(SelfTest(f"{name}.crl[{url}]", _crl_url_test(plugin, url, issuers)))
    if settings.ocsp_responder:
        tests.append(SelfTest(f"{name}.ocsp[{settings.ocsp_responder}]", _ocsp_test(plugin, settings.ocsp_responder)))
    if not settings.crl_files and not urls and not settings.ocsp_responder:
        tests.append(SelfTest(f"{name}.revocation", lambda: CheckResult.ok(
            f"policy {settings.policy}: sources come from each certificate (CRL distribution points, "
            "OCSP in authority information access); none to test in advance")))
    return tests


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether *issuer* signed *cert* (names and signature; a key type it cannot check: no)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm
        return False
    return True


def _listener(plugin: ClientCertPlugin) -> CheckResult:
    listener = plugin.settings.listener
    try:
        plugin.listener.ssl_context()
        certs = x509.load_pem_x509_certificates(listener.certificate.read_bytes())
    except Exception as exc:
        return CheckResult.fail(f"{listener.certificate}: {exc}", "check listener.certificate, key and key_password")
    return _expiry(certs[:1], f"{listener.address} {listener.certificate}", "renew the listener's certificate")
