"""What ``/readyz`` says about certificate logins: trust anchors, each CRL source, the OCSP
responder. Reads ``revocation`` (``policy``, ``ocsp_responder``, ``crl_urls``, ``crl_files``,
``crl_grace``, ``timeout``) and ``clock_tolerance``.

:meth:`RevocationHealth.probe` does the I/O on the core's health thread (``gateway_probe``,
every ``health.probe_interval``): it re-fetches the CRLs that are due (the refresher's own job,
run now too so a failure is known at start-up; locks and back-off keep it from fetching twice)
and asks a configured OCSP responder about a serial that does not exist (any well-formed answer
proves it reachable). :meth:`RevocationHealth.states` reports from memory only.

Under ``hard-fail`` a certificate whose revocation status is unknown is refused, so the step
cannot serve when *no* revocation source works: a ``client_cert.revocation`` component marked
``required`` says so and turns ``/readyz`` false when this is the only step. Under ``soft-fail``
broken sources show as not ready (and the step as degraded) but logins go on.
"""

from __future__ import annotations

import datetime as dt

from gateway import ComponentState

from .fetch import FetchError
from .revocation import RevocationChecker
from .settings import ClientCertSettings

__all__ = ["RevocationHealth"]


class RevocationHealth:
    def __init__(self, name: str, settings: ClientCertSettings, revocation: RevocationChecker, issuer) -> None:
        self.name = name
        self.settings = settings
        self.revocation = revocation
        self.issuer = issuer  # any trusted CA certificate: the OCSP probe's question names it
        self._ocsp: ComponentState | None = None

    def probe(self) -> None:
        if not self.revocation.enabled:
            return
        self.revocation.crls.refresh()
        url = self.settings.revocation.ocsp_responder
        if url:
            try:
                said = self.revocation.ocsp.probe(url, self.issuer)
            except FetchError as exc:
                self._ocsp = ComponentState(f"{self.name}.ocsp[{url}]", False, str(exc))
            else:
                self._ocsp = ComponentState(f"{self.name}.ocsp[{url}]", True, f"answers ({said})")

    def states(self) -> list[ComponentState]:
        if not self.revocation.enabled:
            return []
        now = dt.datetime.now(dt.timezone.utc)
        errors = self.revocation.crls.fetch_errors()
        states = []
        for source, loaded in self.revocation.crls.sources():
            error = errors.get(source)
            if loaded is None:
                problem = f"fetch failed: {error}" if error else "not fetched yet"
            else:
                problem = loaded.too_old(now, self.settings.revocation, self.settings.clock_tolerance)
                if problem and error:
                    problem += f"; last fetch failed: {error}"
            detail = problem or f"{len(loaded.serials)} revoked serials" + (f"; last fetch failed: {error}" if error else "")
            states.append(ComponentState(f"{self.name}.crl[{source}]", problem is None, detail))
        if self._ocsp is not None:
            states.append(self._ocsp)
        if self.settings.revocation.policy == "hard-fail" and states:
            usable = sum(s.ready for s in states)
            states.append(ComponentState(
                f"{self.name}.revocation", usable > 0,
                f"hard-fail: {usable} of {len(states)} revocation source(s) usable"
                + ("" if usable else "; every certificate login is refused (cert.revocation_unknown)"),
                required=True))
        return states
