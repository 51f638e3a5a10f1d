"""Revocation status of a verified path: CRLs, then OCSP, under the operator's policy.

For each certificate checked (the leaf, or with ``check: chain`` every certificate below the
root) both kinds of source are asked, so that either can catch a revocation:

1. CRLs (files, configured URLs, the certificate's distribution points). A CRL that lists the
   serial is final, even when it is stale: revocation is permanent (RFC 5280 section 3.3; a
   certificateHold is treated the same, fail closed).
2. OCSP (configured responder, else the AIA responder). ``revoked`` is final, ``good`` is good.
3. Otherwise a fresh CRL that does not list the serial is good; anything else is unknown.

``soft-fail`` allows unknown (and logs it), ``hard-fail`` denies it with
``cert.revocation_unknown``: a certificate with no reachable, fresh source, or only a CRL past
its ``nextUpdate`` (+ ``crl_grace``), is denied.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

from cryptography import x509

from .crl import CrlStore
from .ocsp import OcspClient
from .settings import RevocationSettings
from .status import Status, Verdict

__all__ = ["RevocationChecker"]


class RevocationChecker:
    def __init__(self, settings: RevocationSettings, log: logging.Logger, tolerance: float,
                 responder_cert: x509.Certificate | None = None, cas: Sequence[x509.Certificate] = ()) -> None:
        self.settings = settings
        self.log = log
        self.crls = CrlStore(settings, log, tolerance, cas)
        self.ocsp = OcspClient(settings, log, tolerance, responder_cert)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.policy != "off"

    def check(self, path: Sequence[x509.Certificate], deadline: float) -> Verdict:
        """GOOD, REVOKED or UNKNOWN for the verified *path* (leaf first, root last)."""
        count = len(path) - 1 if self.settings.check == "chain" else 1
        unknown: list[str] = []
        for index in range(min(count, len(path) - 1)):
            cert, issuer = path[index], path[index + 1]
            verdict = self.one(cert, issuer, deadline)
            if verdict.status is Status.REVOKED:
                return Verdict(Status.REVOKED, f"{cert.subject.rfc4514_string()}: {verdict.detail}")
            if verdict.status is not Status.GOOD:
                unknown.append(f"{cert.subject.rfc4514_string()}: {verdict.detail}")
        if unknown:
            return Verdict(Status.UNKNOWN, "; ".join(unknown))
        return Verdict(Status.GOOD, "")

    def one(self, cert: x509.Certificate, issuer: x509.Certificate, deadline: float) -> Verdict:
        by_crl = self.crls.status(cert, issuer, deadline)
        if by_crl.status is Status.REVOKED:
            return by_crl
        by_ocsp = self.ocsp.status(cert, issuer, deadline)
        if by_ocsp.status in (Status.REVOKED, Status.GOOD):
            return by_ocsp
        if by_crl.status is Status.GOOD:
            return by_crl
        details = [v.detail for v in (by_crl, by_ocsp) if v.detail]
        return Verdict(Status.UNKNOWN, "; ".join(details) or "no revocation source")

    # -- background refresh ------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="client_cert-crl-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout + 1)
            self._thread = None

    def _run(self) -> None:
        # Wake often enough to catch a nextUpdate, but do the work only when something is due.
        interval = min(30.0, self.settings.crl_refresh_interval)
        while not self._stop.is_set():
            try:
                self.crls.refresh()
            except Exception:  # the refresher must outlive any one bad CRL
                self.log.exception("CRL refresh failed")
            self._stop.wait(interval)
