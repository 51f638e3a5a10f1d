"""Accepting one Negotiate token with python-gssapi, and saying why when it fails.

Acceptor credentials come from an explicit credential store (MIT ``gss_acquire_cred_from``):
``{"keytab": PATH, "rcache": "file2:PATH"}``, never from ``KRB5_KTNAME`` or the process-wide
default, so that two plugin instances (or a test) cannot leak keys into each other. They are
re-acquired when the keytab file changes (inode, mtime or size), so a rotated keytab is used by
the next request without a restart.

The replay cache stays on: MIT's ``file2`` cache is safe for several processes, so every worker
shares one file and a token accepted by one worker is a replay for all (RFC 4120 section 3.2.3).
MIT takes that file's lock with ``F_OFD_SETLKW`` and waits for it without end; on the event loop
(``loop_capable``) a lock another process kept, or a FIFO at the cache's path, froze the whole
worker, ``/healthz`` included (review of the Kerberos plugin); on a chain thread it kept the
thread past the attempt's 503 for as long as the lock was held. So the accept first waits,
until the attempt's deadline, for the lock to be free: parked (:mod:`gateway.aio`) on the loop,
asleep on a thread.

Each request gets its own context through the *raw* ``accept_sec_context``: the high-level
``SecurityContext.step()`` defers some failures (it returns the error token and raises only on a
later property read), and code that treats "no exception" as success then accepts replays
(DESIGN.md section 9). Here success means: no error, no further step wanted, an initiator name,
and the Kerberos mechanism. Anything else is an :class:`AcceptFailed` with a reason code.

A failure is classified by numbers, never by GSSAPI's message: MIT writes the ticket's clear-text
server name into it, which the client chooses (``HTTP/replay cache@REALM`` made a forged ticket a
503 and ``/readyz`` false). The numbers are the RFC 4120 error code of the KRB-ERROR the acceptor
made (present when the client asked for mutual authentication), else the GSS minor status when
it is a krb5 code: through SPNEGO it is not, as MIT's mechglue hands out stand-in numbers from
100000 for minor codes two mechanisms both report. A failure that no code explains is the
gateway's only when the replay cache, checked here on its own, is unusable.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import gssapi
import gssapi.raw as gss
from gssapi.raw import ext_cred_store, ext_rfc4178

from gateway import aio

from .keytab import KeytabError, KeytabIndex, file_signature, read_keytab
from .tokens import KRB5_MS_OID, KRB5_OID, KRB5_OIDS, SPNEGO_OID, NegotiateToken, TicketInfo, enctype_name, krb_error_of

__all__ = ["AcceptFailed", "Accepted", "Acceptor", "HINTS", "gss_message"]

_KRB5 = gssapi.OID.from_int_seq(KRB5_OID)
_KRB5_MS = gssapi.OID.from_int_seq(KRB5_MS_OID)
#: The mechanisms the acceptor's credentials are for. Named: MIT's default set leaves out
#: Microsoft's Kerberos OID, which the token check lets through (Windows sends it), and such a
#: token, 22 bytes without a ticket, failed for want of credentials: a 503 blaming the keytab,
#: ``/readyz`` false until the next probe, a warning per request (review of the Kerberos plugin).
_ACCEPTED_MECHS = [_KRB5, _KRB5_MS, gssapi.OID.from_int_seq(SPNEGO_OID)]
#: The Kerberos mechanisms as GSSAPI OIDs: compared as such (an OID's dotted_form is built in
#: Python on each read, a microsecond or more per login).
_KRB5_MECHS = frozenset(map(gssapi.OID.from_int_seq, KRB5_OIDS))

#: RFC 4120 section 7.5.9 error codes the acceptor puts in its KRB-ERROR.
_KRB_AP_ERR_BAD_INTEGRITY, _KRB_AP_ERR_TKT_EXPIRED, _KRB_AP_ERR_TKT_NYV = 31, 32, 33
_KRB_AP_ERR_REPEAT, _KRB_AP_ERR_NOT_US, _KRB_AP_ERR_SKEW = 34, 35, 37
_KRB_AP_ERR_MODIFIED, _KRB_AP_ERR_BADKEYVER, _KRB_AP_ERR_NOKEY = 41, 44, 45
_KDC_ERR_ETYPE_NOSUPP = 14
#: The generic code MIT puts in its KRB-ERROR for a failure outside RFC 4120's codes (errno values,
#: ASN.1, replay cache and keytab errors alike): it says nothing about whose failure it was.
_KRB_ERR_GENERIC = 60

#: MIT's krb5 com_err table (krb5_err.et, ``ERROR_TABLE_BASE_krb5`` in krb5.h): its codes 0-127
#: are RFC 4120's error codes plus this base.
_KRB5_ERR_BASE = -1765328384
#: The table's replay cache errors (``KRB5_RC_TYPE_EXISTS`` .. ``KRB5_RC_IO_SPACE``,
#: ``KRB5_RCACHE_BADVNO``, ``KRB5_RC_REQUIRED``) but ``KRB5_RC_REPLAY``, a replay. MIT's ``file2``
#: cache reports errno values instead; these come from other cache types.
_KRB5_RC_REPLAY = _KRB5_ERR_BASE + 163
_RCACHE_ERRORS = frozenset(range(_KRB5_ERR_BASE + 159, _KRB5_ERR_BASE + 173)) - {_KRB5_RC_REPLAY} \
    | {_KRB5_ERR_BASE + 211, _KRB5_ERR_BASE + 215}

#: ``F_OFD_GETLK`` asks who would stop a write lock on the whole file (start 0, length 0, and
#: ``l_pid`` 0 as OFD requests need): ``l_type`` first, everything else zero, in any ``struct
#: flock`` layout; the kernel writes its answer into the same bytes (``l_type`` first again).
_WHOLE_FILE_WRITE_LOCK = struct.pack("h", fcntl.F_WRLCK) + bytes(62)
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)  # Linux; MIT locks with it there
#: How long a replay cache found locked is looked at again before the login is parked.
_LOCK_SPIN = 0.0002
#: Between two later looks at a locked replay cache: from a millisecond (another worker's store takes
#: microseconds) up to this.
_LOCK_POLL_MAX = 0.05

#: What an operator should check, per reason (also in docs/plugins/kerberos.md).
HINTS = {
    "clock_skew": "check time synchronisation (NTP/chrony) of this host, the KDC and the client; "
                  "the allowed skew is [libdefaults] clockskew in krb5.conf (default 300 s)",
    "ticket_expired": "the client's ticket has expired: the client should renew it (kinit, or lock "
                      "and unlock the session); if it just got one, check the clocks",
    "replay": "the same token arrived twice: a proxy retrying requests, or a captured token "
              "being replayed; tokens are single-use",
    "wrong_kvno": "the keytab is older (or newer) than the key the KDC used: re-export it "
                  "(kadmin ktadd -norandkey, ktpass, msktutil) and compare with `kvno SPN`",
    "key_mismatch": "the keytab has the right key version but a different key (the account's "
                    "password was reset without a new kvno): re-export the keytab",
    "keytab_entry_missing": "the client asked the KDC for a service this keytab has no key for: "
                            "check the host name in the URL, the SPN registered for it "
                            "(setspn -Q HTTP/host) and the keytab (klist -k -e)",
    "wrong_principal": "the ticket is for another service than kerberos.service_principal: check "
                       "the host name in the URL and the SPN, or drop service_principal to accept "
                       "any key in the keytab",
    "unsupported_enctype": "the KDC encrypted the ticket with an encryption type the keytab has no "
                           "key for (or krb5.conf does not permit): re-export the keytab with that "
                           "type (AES), or fix msDS-SupportedEncryptionTypes on the account",
    "malformed_token": "the Authorization header is not a Kerberos/SPNEGO token: a client bug or "
                       "a proxy rewriting headers",
    "unsupported_mechanism": "the client did not send a Kerberos ticket (no ticket for this "
                             "service, or the host is not in the browser's trusted/intranet sites)",
    "ntlm_not_supported": "the client fell back to NTLM: it has no Kerberos ticket for this host; "
                          "check the browser's intranet zone / negotiate-auth.trusted-uris, the "
                          "client's TGT (klist) and the SPN",
    "realm_not_allowed": "the principal's realm is not in kerberos.realms and no kerberos.rules entry "
                         "matches: add it if that realm's users should log in",
    "cross_realm_not_allowed": "a key in the keytab of a realm that is neither kerberos.service_principal's "
                               "nor in kerberos.realms opened a ticket naming a client of another realm: "
                               "that realm's KDC can name anyone so (a forged cross-realm ticket?); if its "
                               "trust is real, set kerberos.service_principal to the service in that realm",
    "principal_not_mapped": "the principal has an instance (user/admin@REALM) or maps to an unusable "
                            "name: add a kerberos.rules entry if it should log in",
    "anonymous": "an anonymous (PKINIT) ticket proves no user",
    "principal_not_utf8": "the KDC named a principal whose bytes are not UTF-8, which no username can "
                          "stand for: rename it in the KDC (or the trusted realm's) if it should log in",
    "replay_cache_unavailable": "the replay cache cannot be written: check kerberos.replay_cache (default "
                                "STATE_DIR/kerberos/), its owner, mode and free space",
    "keytab_unavailable": "the keytab cannot be read by the gateway's user, or has no usable key: "
                          "check kerberos.keytab, its owner and mode, and `authgw check`",
    "rejected": "GSSAPI refused the token; the detail has the library's message",
}


@dataclass(frozen=True, slots=True)
class Accepted:
    principal: str
    #: The service principal whose key opened the ticket, as the context reports it: not the
    #: ticket's clear-text sname and realm, which the client writes (without an acceptor name,
    #: MIT tries every key in the keytab whatever the header says).
    service: str
    #: The acceptor's last token (the SPNEGO accept-completed answer carrying the AP-REP, RFC
    #: 4559 section 5); the front door sends it with the 200 for mutual authentication.
    output_token: bytes


class AcceptFailed(Exception):
    """Why a token was not accepted. ``unavailable`` means the gateway, not the client, failed."""

    def __init__(self, reason: str, detail: str, *, unavailable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.unavailable = unavailable

    @property
    def hint(self) -> str:
        return HINTS.get(self.reason, "")


@dataclass(frozen=True, slots=True)
class _Loaded:
    creds: gss.Creds
    index: KeytabIndex


class _HeldFile:
    """An open descriptor, closed when the last reference goes (a reload's new acceptor)."""

    __slots__ = ("fd", "file", "__weakref__")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.file: tuple[int, int] = (-1, -1)
        weakref.finalize(self, os.close, fd)


class Acceptor:
    """Thread-safe: credentials are shared read-only, each call makes its own context."""

    def __init__(self, keytab: Path, rcache: Path, service_principal: str | None) -> None:
        self.keytab = Path(keytab)
        self.rcache = Path(rcache)
        self.service_principal = service_principal
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._rcache_path = os.fsencode(self.rcache)
        self._rcache_held: _HeldFile | None = None

    # -- credentials ------------------------------------------------------------------------------

    def store(self) -> dict[bytes, bytes]:
        return {b"keytab": f"FILE:{self.keytab}".encode(), b"rcache": f"file2:{self.rcache}".encode()}

    def acceptor_name(self) -> gss.Name | None:
        if not self.service_principal:
            return None  # GSS_C_NO_NAME: any key in the keytab (MIT "ignore_acceptor_hostname" style)
        return gss.import_name(self.service_principal.encode(), gssapi.NameType.kerberos_principal)

    def load(self) -> _Loaded:
        """The current credentials, re-acquired when the keytab file changed since the last call."""
        try:
            signature = file_signature(self.keytab)
        except OSError as exc:
            raise AcceptFailed("keytab_unavailable", f"keytab {self.keytab}: {exc.strerror}", unavailable=True) from None
        loaded = self._loaded
        if loaded is not None and loaded.index.signature == signature:
            return loaded
        with self._lock:
            loaded = self._loaded
            if loaded is not None and loaded.index.signature == signature:
                return loaded
            try:
                index = read_keytab(self.keytab)
                creds = ext_cred_store.acquire_cred_from(self.store(), name=self.acceptor_name(), usage="accept",
                                                         mechs=_ACCEPTED_MECHS).creds
            except (OSError, KeytabError) as exc:
                raise AcceptFailed("keytab_unavailable", f"keytab {self.keytab}: {exc}", unavailable=True) from None
            except gssapi.exceptions.GSSError as exc:
                raise AcceptFailed("keytab_unavailable", f"keytab {self.keytab}: {gss_message(exc)}",
                                   unavailable=True) from None
            # SPNEGO may only settle on Kerberos here, whatever mechanisms (gss-ntlmssp...) the
            # host has installed: NTLM is refused (DESIGN.md section 7), never a fallback.
            ext_rfc4178.set_neg_mechs(creds, [_KRB5, _KRB5_MS])
            self._loaded = _Loaded(creds, index)
            return self._loaded

    # -- accepting ---------------------------------------------------------------------------------

    def accept(self, token: bytes, info: NegotiateToken, deadline: float | None = None) -> Accepted:
        """Accept *token*, by :func:`time.monotonic` *deadline* when one is given."""
        loaded = self.load()
        if deadline is not None:
            # On a chain thread too: MIT's own wait for the lock has no end, and kept the thread
            # after the attempt's 503, for as long as another process held the lock (with
            # `threads: 1`, every later login of the worker waited behind it).
            self.wait_for_replay_cache(deadline)
        try:
            result = gss.accept_sec_context(token, acceptor_creds=loaded.creds)
        except gssapi.exceptions.GSSError as exc:
            raise self.explain(exc, info.ticket(), loaded.index) from None
        if result.more_steps:
            # A single-leg Kerberos exchange completes at once; "continue" is SPNEGO answering
            # with an error or asking for another mechanism. Either way: not authenticated.
            krb = krb_error_of(result.token)
            raise self._from_krb_error(krb.code if krb else None, "", info.ticket(), loaded.index) or \
                AcceptFailed("rejected", "the acceptor wanted another round trip")
        if result.initiator_name is None or result.mech is None or result.mech not in _KRB5_MECHS:
            raise AcceptFailed("unsupported_mechanism", f"the context used mechanism {result.mech}")
        if gssapi.RequirementFlag.anonymity in result.flags:
            raise AcceptFailed("anonymous", "the client authenticated anonymously")
        target = gss.inquire_context(result.context, initiator_name=False, target_name=True, lifetime=False,
                                     mech=False, flags=False, locally_init=False, complete=False).target_name
        if target is None:
            raise AcceptFailed("rejected", "the context names no acceptor")
        return Accepted(_text(result.initiator_name, "client"), _text(target, "service"), result.token or b"")

    def wait_for_replay_cache(self, deadline: float) -> None:
        """Return once MIT's ``file2`` code can take the replay cache's lock at once, or raise
        ``replay_cache_unavailable`` at *deadline*; also for a path that is not a regular file,
        whose read MIT would wait on for ever. A lock seen held is most often another worker's
        store, over in microseconds: it is looked at again for up to :data:`_LOCK_SPIN` before
        the caller waits between looks, as for a process that holds it (on the event loop its
        greenlet is parked, the loop serving; a chain thread sleeps). Parking at once cost about
        25 µs a login under load, when one in fifty found another worker's store under way
        (tools/bench/kerberos_cpu.py).

        This look only keeps MIT's wait off the loop and the threads; it protects nothing against
        replays, and need not be atomic with MIT's lock: MIT finds and writes a token's record
        under that lock in one step (``k5_rcfile2_store``), its own descriptor per store, so
        workers and threads exclude each other there. A lock taken between this look and MIT's
        is another worker's store (MIT waits microseconds), or a local process of the gateway's
        user (or root), which can read the keytab anyway: a lock needs the file open, and MIT
        creates it 0600. A remote client can make a login wait only as long as a store."""
        spin_until = 0.0
        delay = 0.001
        while True:
            held = self._replay_cache_file()
            if held is None or _OFD_GETLK is None:
                return
            try:  # *held* keeps its descriptor open meanwhile, whatever another thread swaps in
                answer = fcntl.fcntl(held.fd, _OFD_GETLK, _WHOLE_FILE_WRITE_LOCK)
            except OSError:
                return  # a file system without locks: MIT does without them too
            if struct.unpack_from("h", answer)[0] == fcntl.F_UNLCK:
                return
            now = time.monotonic()
            if not spin_until:
                spin_until = now + _LOCK_SPIN
            if now < spin_until:
                continue
            left = deadline - now
            if left <= 0:
                raise AcceptFailed("replay_cache_unavailable",
                                   f"replay cache {self.rcache}: locked by another process until the deadline",
                                   unavailable=True)
            if aio.on_loop():
                aio.wait(asyncio.sleep(min(delay, left)))
            else:
                time.sleep(min(delay, left))
            delay = min(delay * 2, _LOCK_POLL_MAX)

    def _replay_cache_file(self) -> _HeldFile | None:
        """The file now at the replay cache's path, open to ask about its locks; kept
        open while the path names the same file, so a login costs a ``stat`` rather than an
        ``open`` and a ``close``. (MIT's ``file2`` code never renames the file, it writes over
        expired records; the path names another file only when someone replaced it.)
        None where there is nothing to ask: MIT creates a missing file, and explain() says
        why one it cannot open fails."""
        try:
            st = os.stat(self._rcache_path)
        except OSError:
            return None
        self._regular(st)
        held = self._rcache_held
        if held is not None and held.file == (st.st_dev, st.st_ino):
            return held
        try:
            fd = os.open(self._rcache_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        held = _HeldFile(fd)
        try:
            opened = os.fstat(fd)  # the path may have changed again since the stat
        except OSError:
            return None
        self._regular(opened)
        held.file = (opened.st_dev, opened.st_ino)
        self._rcache_held = held
        return held

    def _regular(self, st: os.stat_result) -> None:
        """Refuse a replay cache that is not a regular file (a FIFO: MIT's read waits for ever)."""
        if not stat.S_ISREG(st.st_mode):
            raise AcceptFailed("replay_cache_unavailable", f"replay cache {self.rcache}: not a regular file",
                               unavailable=True)

    # -- explaining ----------------------------------------------------------------------------------

    def explain(self, exc: gssapi.exceptions.GSSError, ticket: TicketInfo | None, index: KeytabIndex) -> AcceptFailed:
        """Why GSSAPI refused the token, from its status codes; its message is only the detail."""
        message = gss_message(exc)
        minor = _signed(exc.min_code)
        krb = krb_error_of(exc.token)
        code = krb.code if krb else _rfc_code(minor)
        if minor == _KRB5_RC_REPLAY:
            code = _KRB_AP_ERR_REPEAT
        found = self._from_krb_error(code, message, ticket, index)
        if found is not None:
            return found
        # python-gssapi raises a subclass per GSS status (RFC 2744 section 3.9.1).
        if isinstance(exc, gss.DuplicateTokenError):
            return AcceptFailed("replay", message)
        if isinstance(exc, gss.InvalidTokenError):
            return AcceptFailed("malformed_token", message)
        if isinstance(exc, gss.BadMechanismError):
            return AcceptFailed("unsupported_mechanism", message)
        if isinstance(exc, (gss.MissingCredentialsError, gss.InvalidCredentialsError)):
            # MIT reports these for the acceptor credentials, before it reads the client's token;
            # but also for a token of a mechanism they are not for, which is the client's doing:
            # the gateway's fault only when its keytab, checked here on its own, cannot be read.
            problem = self.keytab_problem()
            if problem:
                return AcceptFailed("keytab_unavailable", problem, unavailable=True)
            return AcceptFailed("unsupported_mechanism", message)
        if code is None or code == _KRB_ERR_GENERIC:
            # What the client's bytes cannot decide: our own file, checked as MIT opens it.
            problem = self.replay_cache_problem()
            if not problem and minor in _RCACHE_ERRORS:  # another cache type's own error
                problem = f"replay cache {self.rcache}: krb5 error {minor} (krb5_err.et)"
            if problem:
                return AcceptFailed("replay_cache_unavailable", problem, unavailable=True)
        about = f"{ticket.describe()}; " if ticket else ""
        return AcceptFailed("rejected", about + message)

    def _from_krb_error(self, code: int | None, message: str, ticket: TicketInfo | None,
                        index: KeytabIndex) -> AcceptFailed | None:
        """The reason for RFC 4120 error *code*, or for a ticket whose clear-text header (the
        client's) names no key of the keytab; ``None`` when neither says."""
        about = f"{ticket.describe()}; " if ticket else ""
        if code in (_KRB_AP_ERR_SKEW, _KRB_AP_ERR_TKT_NYV):
            return AcceptFailed("clock_skew", about + (message or "the client's clock differs from ours"))
        if code == _KRB_AP_ERR_TKT_EXPIRED:
            return AcceptFailed("ticket_expired", about + (message or "ticket expired"))
        if code == _KRB_AP_ERR_REPEAT:
            return AcceptFailed("replay", about + (message or "request is a replay"))
        keyed = self._keytab_reason(ticket, index) if ticket else None
        if keyed is not None:
            return keyed
        if code == _KDC_ERR_ETYPE_NOSUPP:
            return AcceptFailed("unsupported_enctype", about + message)
        if code == _KRB_AP_ERR_BADKEYVER:
            return AcceptFailed("wrong_kvno", about + message)
        if code in (_KRB_AP_ERR_NOT_US, _KRB_AP_ERR_NOKEY):
            return AcceptFailed("keytab_entry_missing", about + message)
        if code in (_KRB_AP_ERR_BAD_INTEGRITY, _KRB_AP_ERR_MODIFIED) and ticket is not None:
            # Our keytab has this service, kvno and enctype, yet the ticket does not decrypt.
            return AcceptFailed("key_mismatch", f"{about}keytab has {index.describe(ticket.service)}; {message}")
        return None

    def keytab_problem(self) -> str:
        """Why the keytab cannot be read now (as :meth:`load` reads it); ``""`` when it can.
        Only the gateway's own file decides, never anything a client sent."""
        try:
            read_keytab(self.keytab)
        except (OSError, KeytabError) as exc:
            return f"keytab {self.keytab}: {exc}"
        return ""

    def replay_cache_problem(self) -> str:
        """Why MIT's ``file2`` code cannot use the replay cache, found by opening it as that code
        does (read-write, created 0600) and by the free space of its file system; ``""`` when
        nothing is wrong. Only the gateway's own state decides, never anything a client sent."""
        try:
            fd = os.open(self.rcache, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                space = os.fstatvfs(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"replay cache {self.rcache}: {exc.strerror}"
        if not regular:
            return f"replay cache {self.rcache}: not a regular file"
        if (space.f_bfree if os.geteuid() == 0 else space.f_bavail) == 0:
            return f"replay cache {self.rcache}: no space left on its file system"
        return ""

    def _keytab_reason(self, ticket: TicketInfo, index: KeytabIndex) -> AcceptFailed | None:
        """Compare the ticket's clear-text header with the keytab's table of contents."""
        spn = self.service_principal
        if spn and ticket.service != spn and (("@" in spn) or ticket.service.split("@")[0] != spn):
            return AcceptFailed("wrong_principal", f"{ticket.describe()}; this gateway accepts only {spn}")
        kvnos = index.kvnos(ticket.service)
        if not kvnos:
            held = ", ".join(index.principals) or "nothing"
            return AcceptFailed("keytab_entry_missing",
                                f"{ticket.describe()}; keytab {index.path} has no key for it (it holds {held})")
        if ticket.kvno is not None and ticket.kvno not in kvnos:
            return AcceptFailed("wrong_kvno", f"{ticket.describe()}; keytab {index.path} has "
                                              f"{index.describe(ticket.service)}")
        if ticket.etype not in index.enctypes(ticket.service, ticket.kvno):
            return AcceptFailed("unsupported_enctype",
                                f"{ticket.describe()}; keytab {index.path} has {index.describe(ticket.service)}, "
                                f"no {enctype_name(ticket.etype)} key")
        return None


def _signed(status: int) -> int:
    """A GSS minor status (an ``OM_uint32``) as the signed ``krb5_error_code`` of MIT's tables."""
    return status - (1 << 32) if status >= 1 << 31 else status


def _rfc_code(minor: int) -> int | None:
    """The RFC 4120 error code a krb5 minor status stands for, or ``None`` for any other status
    (errno values, other tables, the mechglue's stand-in numbers)."""
    code = minor - _KRB5_ERR_BASE
    return code if 0 <= code < 128 else None


def _text(name: gss.Name, role: str) -> str:
    """*name* as text, refusing one that is not UTF-8. MIT's principals are bytes, and its KDC
    creates and (with ``disable_pac``, as before 1.20; a trusted realm's KDC names whom it likes)
    issues tickets for ``alice\\xff`` and ``alice\\xfe`` alike: decoded with replacement
    characters, both logged in as ``alice\\ufffd``, one username and subject for two accounts
    (Kerberos review, items left). No decoding of such bytes is safe to map, so none is tried."""
    raw = gss.display_name(name, name_type=False).name
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AcceptFailed("principal_not_utf8", f"the {role} principal {raw.decode('utf-8', 'backslashreplace')} "
                                                 "is not UTF-8") from None


def gss_message(exc: gssapi.exceptions.GSSError) -> str:
    """The library's text without the boilerplate (principal names and codes, never keys)."""
    texts: list[str] = []
    for code, is_major in ((exc.min_code, False), (exc.maj_code, True)):
        if texts or not code:
            continue
        try:
            texts = [t for t in exc.get_all_statuses(code, is_major) if t and "Minor code may" not in t]
        except Exception:  # display_status can fail on odd codes; the numbers still help
            texts = []
    return "; ".join(texts) or f"GSSAPI major {exc.maj_code:#x} minor {exc.min_code}"
