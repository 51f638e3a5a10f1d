"""Certificate revocation lists (RFC 5280 sections 5 and 6.3): files and fetched URLs.

A CRL applies to a certificate when its issuer name equals the certificate's issuer, its
signature verifies with the issuer's key (the issuer taken from the verified path, never from the
CRL), and its issuingDistributionPoint, if it has one, covers the certificate (RFC 5280 5.2.5,
6.3.3 (b)(2)): the kind of certificate it lists, and the partition it is. A CRL that names its
distribution point covers only certificates whose CRL distribution points name one of its URIs
(a relative name is not matched: fail closed). The issuer's CRLs that leave a certificate out make
its status unknown, never good. Indirect CRLs and delta CRLs are not supported: such CRLs are
skipped and logged. Fetched CRLs are kept until their ``nextUpdate`` and refreshed in the
background every ``crl_refresh_interval``.

A URL is fetched over plain http as a rule, so whoever is on the path can serve anything there. A
fetched CRL is therefore held, and trusted for the no-rollback comparison and for the time of the
next fetch, only once it is checked (:meth:`CrlStore._refusal`): issued and signed by a CA the URL
serves, that CA allowed to sign CRLs, its thisUpdate not in the future, and neither older nor
lower-numbered than the CRL held of the same CA. A URL serves the verified issuer of each
certificate that names it in its distribution points; a configured URL, the configured CAs and
the verified issuer of any certificate checked. A CRL that fails is refused and the one held
kept (review of the certificate plugin: a forged CRL replaced the held one, and one dated 2036
shut the CA's own out).

A URL that serves several CAs (a configured one serves them all) holds one CRL per CA, each
compared only with that CA's. With one CRL per URL, the first CRL held pinned the URL to its
issuer: another configured CA's genuine CRL served there once, at start-up, by whoever is on the
path (a root's CRL at the issuing CA's URL) was held, and the issuing CA's own CRLs were refused
from then on as "of another issuer" until a restart. Its certificates had no CRL: revoked ones
logged in under soft-fail, and hard-fail refused them all, with readiness saying the CRL was fresh
(review of the certificate plugin). Which CRL a URL served last still decides when it is fetched
again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.settings import shown_url

from .fetch import Backoff, FetchError, fetch
from .settings import RevocationSettings
from .status import Status, Verdict, later_than

__all__ = ["CrlStore", "LoadedCrl", "RefusedCrl", "parse_crl"]

UTC = dt.timezone.utc
_MAX_URLS = 256
_FILE_CHECK_INTERVAL = 2.0
_HTTP = ("http://", "https://")  # ldap:// distribution points are not fetched
_REFUSAL_WARNING_EVERY = 600.0  # seconds between two warnings of a URL's refused CRLs


class RefusedCrl(FetchError):
    """A CRL was fetched but failed a check; the one held is kept. Logged where it is raised."""


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _key_id(public_key) -> bytes:
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


@dataclass(eq=False)
class LoadedCrl:
    crl: x509.CertificateRevocationList
    source: str
    serials: frozenset[int]
    usable: bool  # False for delta and indirect CRLs
    idp: x509.IssuingDistributionPoint | None
    verified: dict[bytes, bool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def make(cls, crl: x509.CertificateRevocationList, source: str, log: logging.Logger) -> LoadedCrl:
        usable = True
        try:
            crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
            log.warning("CRL %s is a delta CRL; delta CRLs are not supported, skipped", source)
            usable = False
        except x509.ExtensionNotFound:
            pass
        try:
            idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        except x509.ExtensionNotFound:
            idp = None
        if idp is not None and idp.indirect_crl:
            log.warning("CRL %s is an indirect CRL; not supported, skipped", source)
            usable = False
        return cls(crl, source, frozenset(r.serial_number for r in crl), usable, idp)

    def out_of_scope(self, cert: x509.Certificate) -> str | None:
        """Why this CRL's issuingDistributionPoint leaves *cert* out (RFC 5280 6.3.3 (b)(2)), or
        ``None``. Says nothing about issuer or signature (:meth:`applies_to`)."""
        idp = self.idp
        if idp is None:
            return None
        if idp.only_contains_attribute_certs:
            return "it lists attribute certificates only"
        is_ca = _is_ca(cert)
        if idp.only_contains_user_certs and is_ca:
            return "it lists end-entity certificates only"
        if idp.only_contains_ca_certs and not is_ca:
            return "it lists CA certificates only"
        if idp.relative_name is not None:
            return "its distribution point is a relative name, which is not matched"
        # A partitioned CRL (RFC 5280 6.3.3 (b)(2)(i)): one partition's CRL proves nothing about
        # a certificate the CA put in another, even though issuer and signature are right.
        if idp.full_name is not None and not _uris(idp.full_name) & _distribution_point_uris(cert):
            return "it is the CRL of a distribution point the certificate does not name"
        return None

    def applies_to(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        if not self.usable or self.crl.issuer != cert.issuer or self.out_of_scope(cert):
            return False
        return self.signed_by(issuer)

    def signed_by(self, issuer: x509.Certificate) -> bool:
        """*issuer*'s key signed this CRL and *issuer* may sign CRLs (keyUsage cRLSign); the
        answer is remembered per key. Names are not compared here."""
        key = _key_id(issuer.public_key())
        with self.lock:
            known = self.verified.get(key)
        if known is None:
            try:
                known = self.crl.is_signature_valid(issuer.public_key()) and _may_sign_crls(issuer)
            except Exception:  # an unsupported key type: cannot tell, so not applicable
                known = False
            with self.lock:
                self.verified[key] = known
        return known

    def partial(self) -> bool:
        """Covers only some revocation reasons (RFC 5280 5.2.5): cannot prove "good" alone."""
        return self.idp is not None and self.idp.only_some_reasons is not None

    def too_old(self, now: dt.datetime, settings: RevocationSettings, tolerance: float) -> str | None:
        # Compared as differences, never a date plus seconds: a nextUpdate in year 9999 is "not
        # too old", not an OverflowError (review of time).
        next_update = self.crl.next_update_utc
        if later_than(self.crl.last_update_utc, now, tolerance):
            return f"CRL {self.source} has thisUpdate in the future"
        if next_update is not None and later_than(now, next_update, settings.crl_grace):
            return f"CRL {self.source} is too old: nextUpdate was {next_update.isoformat()}"
        if settings.crl_max_age and later_than(now, self.crl.last_update_utc, settings.crl_max_age):
            return f"CRL {self.source} is too old: thisUpdate {self.crl.last_update_utc.isoformat()}"
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _may_sign_crls(issuer: x509.Certificate) -> bool:
    try:
        return issuer.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        return True


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _narrowing(idp: x509.IssuingDistributionPoint | None) -> set[str]:
    """What of an issuingDistributionPoint leaves certificates out of a CRL (RFC 5280 5.2.5)."""
    if idp is None:
        return set()
    return {name for name, on in (("user certificates only", idp.only_contains_user_certs),
                                  ("CA certificates only", idp.only_contains_ca_certs),
                                  ("attribute certificates only", idp.only_contains_attribute_certs),
                                  ("some reasons only", idp.only_some_reasons is not None),
                                  ("an indirect CRL", idp.indirect_crl),
                                  ("a distribution point by relative name", idp.relative_name is not None)) if on}


def _uris(names: list[x509.GeneralName] | None) -> set[str]:
    return {n.value for n in names or () if isinstance(n, x509.UniformResourceIdentifier)}


def _distribution_point_uris(cert: x509.Certificate) -> set[str]:
    """Every URI (http, ldap...) of the certificate's CRL distribution points that its issuer's
    own CRLs serve: a point with a cRLIssuer is served by an indirect CRL (RFC 5280 6.3.3 (b)(1)),
    which is not supported."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return set()
    return {uri for point in points if point.crl_issuer is None for uri in _uris(point.full_name)}


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http(s) URLs of the certificate's CRL distribution points (ldap:// is skipped)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(_HTTP):
                urls.append(name.value)
    return urls


@dataclass
class _UrlEntry:
    crl: LoadedCrl | None = None  # the CRL the URL served last that was held (its nextUpdate: the next fetch)
    # The CRLs held, one per CA (issuer name), each one that passed CrlStore._refusal against that CA's.
    crls: dict[x509.Name, LoadedCrl] = field(default_factory=dict)
    # The CAs this URL serves, which a fetched CRL is checked against: the configured ones for a
    # configured URL, and the verified issuers of the certificates checked against it.
    issuers: set[x509.Certificate] = field(default_factory=set)
    # time.monotonic() of the last successful fetch; None: never. Not 0.0: monotonic() counts
    # from boot, so on a machine up for less than crl_refresh_interval "0.0" would look recent.
    fetched: float | None = None
    used: float = 0.0  # only compared with other entries' (least recently used)
    error: str | None = None  # the last fetch's failure, for readiness; None after a success
    warned: float | None = None  # time.monotonic() of the last warning of a refused CRL
    refused: bool = False  # the last fetch's CRL failed the checks (an issuer learned since may pass it)
    lock: threading.Lock = field(default_factory=threading.Lock)


class CrlStore:
    """CRLs from files and URLs, thread-safe; :meth:`refresh` is the background job."""

    def __init__(self, settings: RevocationSettings, log: logging.Logger, tolerance: float,
                 cas: Sequence[x509.Certificate] = ()) -> None:
        """*cas*: the configured CAs (roots and intermediates), which the configured URLs serve
        from the start."""
        self.settings = settings
        self.log = log
        self.tolerance = tolerance
        self.backoff = Backoff(settings.retry_after_failure)
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[float, LoadedCrl]] = {}
        self._files_checked: float | None = None  # monotonic(); None: never (see _UrlEntry.fetched)
        self._urls: dict[str, _UrlEntry] = {url: _UrlEntry(issuers=set(cas)) for url in settings.crl_urls}
        for path in settings.crl_files:
            self._files[path] = (path.stat().st_mtime, self._load_file(path))

    # -- sources -----------------------------------------------------------------------------------

    def _load_file(self, path: Path) -> LoadedCrl:
        try:
            return LoadedCrl.make(parse_crl(path.read_bytes()), str(path), self.log)
        except ValueError as exc:
            raise ValueError(f"{path}: not a CRL ({exc})") from None

    def _reload_files(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._files_checked is not None and now - self._files_checked < _FILE_CHECK_INTERVAL:
            return
        self._files_checked = now
        for path, (mtime, _) in list(self._files.items()):
            try:
                current = path.stat().st_mtime
                if current != mtime:
                    loaded = self._load_file(path)
                    with self._lock:
                        self._files[path] = (current, loaded)
                    self.log.info("CRL file %s reloaded: %d entries", path, len(loaded.serials))
            except (OSError, ValueError) as exc:  # keep the last good one; it will age out
                self.log.error("CRL file %s not reloaded, keeping the previous one: %s", path, exc)

    def _fetch(self, url: str, entry: _UrlEntry, timeout: float) -> LoadedCrl:
        """Fetch *url* into *entry* (caller holds ``entry.lock``). Raises FetchError, RefusedCrl."""
        data = fetch(url, timeout=timeout, max_bytes=self.settings.crl_max_bytes,
                     accept="application/pkix-crl")
        try:
            loaded = LoadedCrl.make(parse_crl(data), url, self.log)
        except ValueError as exc:
            raise FetchError(f"{shown_url(url)}: not a CRL ({exc})") from None
        self._keep(url, entry, loaded)
        entry.fetched = time.monotonic()
        entry.error, entry.refused = None, False
        return loaded

    def _keep(self, url: str, entry: _UrlEntry, loaded: LoadedCrl) -> None:
        """Hold *loaded* if it passes the checks, else raise RefusedCrl and keep the CRL held
        (caller holds ``entry.lock``)."""
        with self._lock:
            issuers = list(entry.issuers)
        why = self._refusal(url, loaded, entry.crls.get(loaded.crl.issuer), issuers)
        if why:
            self._warn_refused(url, entry, why)
            raise RefusedCrl(f"{shown_url(url)}: CRL refused: {why}")
        entry.crls[loaded.crl.issuer] = entry.crl = loaded

    def _refusal(self, url: str, loaded: LoadedCrl, held: LoadedCrl | None,
                 issuers: list[x509.Certificate]) -> str | None:
        """Why a CRL fetched from *url* must not be held, or ``None``; *held* is the CRL held
        from *url* of the same issuer. The URL is plain http as a rule, so the issuer is one the
        URL is known to serve, never one the CRL names for itself; and a genuine CRL of that CA
        with a narrower scope (another partition, CA certificates only, a delta) does not replace
        the one held, or the certificates the held one covers would lose their answer: "unknown",
        which soft-fail lets in even when revoked. Another CA's CRL replaces nothing: it is held
        beside (module docstring)."""
        crl = loaded.crl
        named = [ca for ca in issuers if ca.subject == crl.issuer]
        if not named:
            return f"its issuer {crl.issuer.rfc4514_string()!r} is not a CA this URL serves"
        if not any(loaded.signed_by(ca) for ca in named):
            return "its signature does not verify with its issuer's key, or that CA may not sign CRLs"
        this_update = crl.last_update_utc
        if later_than(this_update, dt.datetime.now(UTC), self.tolerance):
            return f"its thisUpdate {this_update.isoformat()} is in the future"
        if held is None:
            return None
        if this_update < held.crl.last_update_utc:
            return (f"it is older than the CRL held (thisUpdate {this_update.isoformat()}, "
                    f"held {held.crl.last_update_utc.isoformat()}): a rollback")
        number, held_number = _crl_number(crl), _crl_number(held.crl)
        if number is not None and held_number is not None and number < held_number:
            return f"its CRLNumber {number} is lower than the held CRL's {held_number}: a rollback"
        if held.usable and not loaded.usable:
            return "it is a delta or indirect CRL, which does not replace the complete CRL held"
        if loaded.idp != held.idp and loaded.idp is not None:
            if url not in _uris(loaded.idp.full_name):
                return ("its issuingDistributionPoint is not the held CRL's and does not name this URL: "
                        "the CRL of another partition or of another kind of certificate")
            narrower = _narrowing(loaded.idp) - _narrowing(held.idp)
            if narrower:
                return (f"it covers less than the CRL held ({', '.join(sorted(narrower))}), though it names "
                        "this URL")
        return None

    def _warn_refused(self, url: str, entry: _UrlEntry, why: str) -> None:
        # Whoever serves forged CRLs can have one fetched on every refresh: say it now and then.
        now = time.monotonic()
        if entry.warned is not None and now - entry.warned < _REFUSAL_WARNING_EVERY:
            return
        entry.warned = now
        kept = "the CRL held is kept" if entry.crl is not None else "no CRL from it is held"
        self.log.warning("CRL from %s refused, %s: %s (said at most every %.0f s)", shown_url(url), kept, why,
                         _REFUSAL_WARNING_EVERY)

    def _failed(self, url: str, entry: _UrlEntry, exc: FetchError, what: str) -> str:
        entry.error, entry.refused = str(exc), isinstance(exc, RefusedCrl)
        self.backoff.failed(url, str(exc))
        if not entry.refused:  # warned by _keep, rate-limited
            self.log.warning("%s: %s", what, exc)
        return str(exc)

    def _after_fetch(self, url: str, entry: _UrlEntry) -> None:
        # A CA that has not published a new CRL keeps serving one past its nextUpdate; fetching it
        # again on every login would not help, so such a URL backs off like a failed one.
        if self._needs_fetch(entry, dt.datetime.now(UTC)):
            self.backoff.failed(url, f"{shown_url(url)}: the CRL served is past its nextUpdate")
        else:
            self.backoff.succeeded(url)

    def _needs_fetch(self, entry: _UrlEntry, now: dt.datetime) -> bool:
        if entry.crl is None:
            return True
        next_update = entry.crl.crl.next_update_utc
        if next_update is not None:
            return now >= next_update
        return self._refresh_due(entry)

    def _refresh_due(self, entry: _UrlEntry) -> bool:
        """The periodic re-fetch is due: never fetched, or ``crl_refresh_interval`` passed."""
        return entry.fetched is None or time.monotonic() - entry.fetched >= self.settings.crl_refresh_interval

    def _url_crl(self, url: str, issuer: x509.Certificate, deadline: float,
                 now: dt.datetime) -> tuple[list[LoadedCrl], str | None]:
        """The checked CRLs held from *url* (one per CA), fetched if due, and why they may not
        answer. *issuer*, from a verified path, is a CA this URL serves from now on."""
        with self._lock:
            entry = self._urls.get(url)
            if entry is None:
                learned = [u for u in self._urls if u not in self.settings.crl_urls]
                if len(self._urls) >= _MAX_URLS and learned:  # forget the least recently used one
                    del self._urls[min(learned, key=lambda u: self._urls[u].used)]
                entry = self._urls[url] = _UrlEntry()
            entry.used = time.monotonic()
            learned = issuer not in entry.issuers
            if learned:
                entry.issuers.add(issuer)
        if learned and entry.refused:
            # Refused for want of this issuer, say (a configured URL of a CA that only clients
            # present): fetched again now, not after retry_after_failure.
            self.backoff.succeeded(url)
        if not self._needs_fetch(entry, now):
            return list(entry.crls.values()), None
        blocked = self.backoff.blocked(url)
        if blocked:
            return list(entry.crls.values()), f"recent fetch failed: {blocked}"
        timeout = min(self.settings.timeout, deadline - time.monotonic() - 0.1)
        if timeout <= 0.05:
            return list(entry.crls.values()), f"{shown_url(url)}: no time left to fetch"
        if not entry.lock.acquire(timeout=timeout):
            return list(entry.crls.values()), f"{shown_url(url)}: another fetch is still running"
        try:
            if self._needs_fetch(entry, now):  # another thread may have fetched meanwhile
                self._fetch(url, entry, timeout)
                self._after_fetch(url, entry)
            return list(entry.crls.values()), None
        except FetchError as exc:
            return list(entry.crls.values()), self._failed(url, entry, exc, "CRL fetch failed")
        finally:
            entry.lock.release()

    # -- status ------------------------------------------------------------------------------------

    def status(self, cert: x509.Certificate, issuer: x509.Certificate, deadline: float) -> Verdict:
        """REVOKED if an applicable CRL lists the serial (even a stale one), GOOD if a fresh
        complete one does not, UNKNOWN when CRLs should answer but cannot (unreachable, too old,
        or the issuer's CRLs held leave this certificate out), NONE when no CRL source covers this
        issuer."""
        now = dt.datetime.now(UTC)
        self._reload_files()
        with self._lock:
            candidates: list[LoadedCrl] = [loaded for _, loaded in self._files.values()]
        urls = list(self.settings.crl_urls)
        if self.settings.crl_distribution_points:
            urls += [u for u in distribution_points(cert) if u not in urls]
        problems: list[str] = []
        for url in urls:
            held, problem = self._url_crl(url, issuer, deadline, now)
            candidates.extend(held)
            # A configured URL may serve one issuer; its failure matters only to that issuer's certs.
            if problem and (url not in self.settings.crl_urls or any(c.applies_to(cert, issuer) for c in held)):
                problems.append(problem)
        applicable = [c for c in candidates if c.applies_to(cert, issuer)]
        for loaded in applicable:
            if cert.serial_number in loaded.serials:
                return Verdict(Status.REVOKED, f"serial {cert.serial_number:x} is on CRL {loaded.source}")
        stale = []
        for loaded in applicable:
            age = loaded.too_old(now, self.settings, self.tolerance)
            if age:
                stale.append(age)
            elif not loaded.partial():
                return Verdict(Status.GOOD, f"not on CRL {loaded.source}")
        # The issuer's CRLs held do not cover this certificate (another partition, another kind):
        # its CRL is missing, which is unknown, not "no CRL for this issuer".
        outside = [f"CRL {c.source} does not cover it: {why}" for c in candidates
                   if c.usable and c.crl.issuer == cert.issuer and (why := c.out_of_scope(cert))]
        if stale or problems or outside:
            return Verdict(Status.UNKNOWN, "; ".join(stale + problems + outside))
        return Verdict(Status.NONE, "no CRL covers this issuer")

    # -- background refresh and self-tests ----------------------------------------------------------

    def refresh(self) -> None:
        """Re-read changed files; re-fetch URLs due (nextUpdate reached or refresh interval over)."""
        self._reload_files(force=True)
        now = dt.datetime.now(UTC)
        with self._lock:
            entries = list(self._urls.items())
        for url, entry in entries:
            due = self._needs_fetch(entry, now) or self._refresh_due(entry)
            if not due or self.backoff.blocked(url) or not entry.lock.acquire(blocking=False):
                continue
            try:
                self._fetch(url, entry, self.settings.timeout)
                self._after_fetch(url, entry)
            except FetchError as exc:
                self._failed(url, entry, exc, "background CRL refresh failed")
            finally:
                entry.lock.release()

    def sources(self) -> list[tuple[str, LoadedCrl | None]]:
        """Every known CRL source and what is held from it (files first)."""
        with self._lock:
            files = [(str(p), loaded) for p, (_, loaded) in self._files.items()]
            urls = [(u, e.crl) for u, e in self._urls.items()]
        return files + urls

    def fetch_errors(self) -> dict[str, str]:
        """The URLs whose last fetch failed, with the error (memory only, for readiness)."""
        with self._lock:
            return {u: e.error for u, e in self._urls.items() if e.error}

    def fetch_now(self, url: str, issuers: Sequence[x509.Certificate] = ()) -> LoadedCrl:
        """Fetch *url* for a self-test (raises FetchError) and keep the result if it passes the
        checks; the self-test judges its signer itself. *issuers*: CAs the URL serves besides those
        it is known to (a distribution point of a configured intermediate serves that CA's issuer,
        which no certificate checked has taught it yet)."""
        with self._lock:
            entry = self._urls.setdefault(url, _UrlEntry())
            entry.issuers.update(issuers)
        with entry.lock:
            return self._fetch(url, entry, self.settings.timeout)
