"""Self-tests for ``authgw check``: the keytab, its keys, the service principal, the KDC, the clock.

The KDC round trip is what ``kinit -k -t KEYTAB SPN; kvno SPN`` does by hand: get a ticket for
the service principal *as* the service principal (from the keytab, into a throwaway ``MEMORY:``
cache), read the key version the KDC used from the ticket's clear-text header, and then accept
that very token with the gateway's own acceptor credentials. The same ticket's ``authtime`` (the
KDC's clock, just now) against ours gives the clock skew. Each test returns a
:class:`~gateway.CheckResult` with a hint; nothing here changes any state except the replay cache.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from dataclasses import dataclass
from functools import cached_property

import gssapi
import gssapi.raw as gss
from gssapi.raw import ext_cred_store, ext_krb5

from gateway import CheckResult, SelfTest

from .acceptor import HINTS, AcceptFailed, Acceptor, gss_message
from .keytab import KeytabError, KeytabIndex, read_keytab
from .tokens import KRB5_OID, WEAK_ENCTYPES, TokenRefused, enctype_name, inspect_token

__all__ = ["KerberosSelfTests"]

_KRB5 = gssapi.OID.from_int_seq(KRB5_OID)
#: MIT's default ``clockskew``; warn well before a login fails.
_SKEW_LIMIT, _SKEW_WARN = 300, 60
_MAX_PROBED = 3


@dataclass(frozen=True, slots=True)
class _Probe:
    """What one KDC round trip found for one service principal."""

    spn: str
    kvno: int | None = None
    etype: int | None = None
    skew: float | None = None
    accepted: AcceptFailed | None | bool = None  # True, or why not
    error: str = ""
    stale: bool = False


class KerberosSelfTests:
    """Built per ``gateway_selftests`` call; the KDC round trip is shared by two tests."""

    def __init__(self, name: str, acceptor: Acceptor) -> None:
        self.name = name
        self.acceptor = acceptor

    def tests(self) -> list[SelfTest]:
        n = self.name
        return [
            SelfTest(f"{n}.keytab", self.keytab_file, prerequisite=True),
            SelfTest(f"{n}.keytab_keys", self.keytab_keys),
            SelfTest(f"{n}.service_principal", self.service_principal, prerequisite=True),
            SelfTest(f"{n}.kdc_kvno", self.kdc_kvno),
            SelfTest(f"{n}.clock_skew", self.clock_skew),
        ]

    # -- the keytab ----------------------------------------------------------------------------------

    @cached_property
    def index(self) -> KeytabIndex:
        return read_keytab(self.acceptor.keytab)

    def keytab_file(self) -> CheckResult:
        path = self.acceptor.keytab
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            index = self.index  # read without blocking: a FIFO there is refused, not waited on
        except OSError as exc:
            return CheckResult.fail(f"{path}: {exc.strerror}", HINTS["keytab_unavailable"])
        except KeytabError as exc:
            return CheckResult.fail(str(exc), "export the keytab again (kadmin ktadd, ktpass, msktutil)")
        detail = f"{path}: {len(index.entries)} keys, mode {mode:o}"
        if not index.entries:
            return CheckResult.fail(detail + ", empty", "export the service principal's keys into it")
        if mode & stat.S_IROTH or mode & stat.S_IWOTH:
            return CheckResult.fail(detail, f"the keytab is the service's password: chmod 600 {path}")
        if mode & (stat.S_IRWXG):
            return CheckResult.warn(detail, f"readable by group: chmod 600 {path} unless that group is only authgw")
        return CheckResult.ok(detail)

    def keytab_keys(self) -> CheckResult:
        index = self.index
        lines = [f"{p}: {index.describe(p)}" for p in index.principals]
        weak = sorted({e.enctype for e in index.entries if e.enctype in WEAK_ENCTYPES})
        detail = "; ".join(lines)
        if weak and all(e.enctype in WEAK_ENCTYPES for e in index.entries):
            return CheckResult.fail(detail, "only weak encryption types (" + ", ".join(map(enctype_name, weak))
                                    + "); export AES keys (RFC 6649, RFC 8429)")
        if weak:
            return CheckResult.warn(detail, "weak encryption types present: " + ", ".join(map(enctype_name, weak)))
        return CheckResult.ok(detail)

    def _probed_principals(self) -> list[str]:
        spn = self.acceptor.service_principal
        if spn:
            return [next((p for p in self.index.principals if p == spn or p.split("@")[0] == spn), spn)]
        http = [p for p in self.index.principals if p.startswith("HTTP/")]
        return (http or self.index.principals)[:_MAX_PROBED]

    def service_principal(self) -> CheckResult:
        spn = self.acceptor.service_principal
        principals = self.index.principals
        if spn:
            found = [p for p in principals if p == spn or ("@" not in spn and p.split("@")[0] == spn)]
            if not found:
                return CheckResult.fail(f"{spn} is not in {self.acceptor.keytab} (it holds {', '.join(principals)})",
                                        "export the key of kerberos.service_principal into the keytab, or fix the name")
            return CheckResult.ok(f"{found[0]}: {self.index.describe(found[0])}")
        others = [p for p in principals if not p.startswith("HTTP/")]
        detail = f"any key in the keytab: {', '.join(principals)}"
        if others:
            return CheckResult.warn(detail, "the keytab holds non-HTTP principals (" + ", ".join(others)
                                    + "), whose tickets this gateway would accept; set "
                                      "kerberos.service_principal or use a dedicated keytab")
        return CheckResult.ok(detail)

    # -- the KDC -------------------------------------------------------------------------------------

    @cached_property
    def probes(self) -> list[_Probe]:
        return [self._probe(spn) for spn in self._probed_principals()]

    def _initiator(self, name: gss.Name) -> tuple[gss.Creds, str]:
        """Whose ticket asks the KDC: the operator's (after ``kinit``, as ``kvno`` would), else
        the service principal's own key from the keytab (as ``kinit -k`` would)."""
        try:
            creds = gss.acquire_cred(None, usage="initiate").creds
            if gss.inquire_cred(creds, name=False, lifetime=True, usage=False, mechs=False).lifetime:
                return creds, "the caller's ticket cache"
        except gssapi.exceptions.GSSError:
            pass
        store = {b"client_keytab": f"FILE:{self.acceptor.keytab}".encode(),
                 b"ccache": f"MEMORY:authgw-selftest-{uuid.uuid4().hex}".encode()}
        return ext_cred_store.acquire_cred_from(store, name=name, usage="initiate").creds, "the keytab"

    def _probe(self, spn: str) -> _Probe:
        name = gss.import_name(spn.encode(), gssapi.NameType.kerberos_principal)
        source = "the keytab"
        try:
            creds, source = self._initiator(name)
            # Without mutual authentication the context is complete after one step, so its authtime
            # is readable (python-gssapi treats an empty flag list as "defaults", so name one).
            init = gss.init_sec_context(name, creds=creds, mech=_KRB5, flags=[gssapi.RequirementFlag.integrity])
            now = time.time()
            skew = ext_krb5.krb5_extract_authtime_from_sec_context(init.context) - now
        except gssapi.exceptions.GSSError as exc:
            message = gss_message(exc)
            # The KDC refused the keytab's key itself: it is stale (a newer kvno) or wrong.
            stale = source == "the keytab" and any(
                s in message.lower() for s in ("preauthentication failed", "password incorrect", "integrity"))
            return _Probe(spn, error=f"{message} (asking with {source})", stale=stale)
        try:
            ticket = inspect_token(init.token).ticket()
        except TokenRefused:
            ticket = None
        if ticket is None:
            return _Probe(spn, error="the KDC's ticket could not be read")
        try:
            self.acceptor.accept(init.token, inspect_token(init.token))
            accepted: AcceptFailed | bool = True
        except AcceptFailed as exc:
            accepted = exc
        return _Probe(spn, ticket.kvno, ticket.etype, skew, accepted)

    def kdc_kvno(self) -> CheckResult:
        results = []
        for probe in self.probes:
            if probe.stale:
                results.append(CheckResult.fail(
                    f"{probe.spn}: the KDC refused the keytab's key ({probe.error})",
                    "the keytab is stale (the KDC has a newer kvno) or holds a wrong key: " + HINTS["wrong_kvno"]))
                continue
            if probe.error:
                results.append(CheckResult.warn(
                    f"{probe.spn}: no ticket from the KDC ({probe.error})",
                    "the KDC is unreachable from here, or the service principal cannot get tickets for itself "
                    "(in AD an SPN is not a UPN); check by hand: kinit USER; kvno SPN; klist -k -e KEYTAB"))
                continue
            head = f"{probe.spn}: KDC issues kvno {probe.kvno} ({enctype_name(probe.etype or 0)})"
            keytab = f"keytab has {self.index.describe(probe.spn)}"
            if probe.accepted is True:
                results.append(CheckResult.ok(f"{head}; {keytab}; a fresh ticket was accepted"))
            else:
                failed = probe.accepted
                results.append(CheckResult.fail(f"{head}; {keytab}; accepting it failed: kerberos.{failed.reason}: "
                                                f"{failed.detail}", failed.hint))
        return _worst(results)

    def clock_skew(self) -> CheckResult:
        for probe in self.probes:
            if probe.skew is not None:
                detail = f"the KDC's clock is {probe.skew:+.0f} s from ours (ticket authtime of {probe.spn})"
                if abs(probe.skew) >= _SKEW_LIMIT:
                    return CheckResult.fail(detail, HINTS["clock_skew"])
                if abs(probe.skew) >= _SKEW_WARN:
                    return CheckResult.warn(detail, HINTS["clock_skew"])
                return CheckResult.ok(detail)
        return CheckResult.warn("cannot read the KDC's clock (no ticket could be obtained)",
                                "see kerberos.kdc_kvno; compare `date -u` here and on the KDC")


def _worst(results: list[CheckResult]) -> CheckResult:
    if not results:
        return CheckResult.warn("no service principal to check")
    order = {"fail": 0, "warn": 1, "pass": 2}
    worst = min(results, key=lambda r: order[r.status.value])
    detail = " | ".join(r.detail for r in results)
    return type(worst)(worst.status, detail, worst.hint)
