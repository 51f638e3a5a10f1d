"""``kerberos``: single sign-on with SPNEGO (``Authorization: Negotiate``, RFC 4559), IP-gated.

A domain-joined browser or ``curl --negotiate -u :`` logs in with its Kerberos ticket. The
plugin is offered only to clients inside ``allowed_networks`` (the address the core resolved
through ``trusted_proxies``), so browsers outside the intranet never see a Kerberos prompt.

Decides
    Negotiate attempts from allowed networks: ``SUCCESS`` (with the directory profile from
    ``gateway_lookup_user`` when a directory plugin is enabled, and the mutual-authentication
    token for the 200 answer), or ``INVALID_CREDENTIALS`` with ``kerberos.<reason>``:
    ``ntlm_not_supported``, ``malformed_token``, ``unsupported_mechanism``, ``replay``,
    ``clock_skew``, ``ticket_expired``, ``wrong_kvno``, ``key_mismatch``,
    ``keytab_entry_missing``, ``wrong_principal``, ``unsupported_enctype``, ``anonymous``,
    ``cross_realm_not_allowed``, ``realm_not_allowed``, ``principal_not_mapped``,
    ``principal_not_utf8``, ``rejected``.
    Each failure is logged with what to check (docs/plugins/kerberos.md). ``ACCOUNT_STATE`` with
    the directory's reason code (``ldap.disabled``, ``ldap.locked``, ``ldap.account_expired``,
    ``static.disabled``; password states only with ``password_state_refuses``) when the looked-up
    account may not log in.
Abstains
    when the attempt has no Negotiate token or the client is outside ``allowed_networks`` (and
    then offers no ``Negotiate`` challenge either); when the directory does not know the mapped
    user (noting ``USER_NOT_FOUND``, ``kerberos.user_not_found``) or cannot be reached (noting
    ``UNAVAILABLE``, ``kerberos.directory_unavailable``); when the keytab cannot be read or the
    replay cache written (noting ``UNAVAILABLE``, ``kerberos.keytab_unavailable``,
    ``kerberos.replay_cache_unavailable``).
Settings (``kerberos:`` in conf.d)
    ``allowed_networks`` (CIDRs, required), ``keytab`` (path, required), ``service_principal``
    (``HTTP/host@REALM``; default any key in the keytab, and then a key of a realm not in
    ``realms`` opens only tickets of its own realm's principals), ``realms`` (strip_realm allowlist),
    ``rules`` (``{match, username}`` regular-expression mapping), ``lowercase_username``,
    ``require_directory_user`` (default true), ``password_state_refuses`` (default false),
    ``replay_cache`` (default in the state directory). From the core: ``health.probe_interval``
    (``gateway_probe`` re-reads a changed keytab and checks it holds a key for the service
    principal; ``/readyz`` shows ``kerberos.keytab`` from that, without waiting for a login).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import unicodedata
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from gateway import (
    MUTUAL_AUTH_KEY,
    Attempt,
    BackendUnavailable,
    ComponentState,
    ConfigPath,
    Decision,
    Identity,
    Outcome,
    PluginContext,
    PluginSettings,
    SelfTest,
    hookimpl,
)
from gateway.chain import may_run_on_loop
from gateway.logs import RateLimitedWarning, printable
from gateway.settings import unmapped_networks

from .acceptor import HINTS, AcceptFailed, Acceptor
from .mapping import CrossRealmPolicy, MappingRule, PrincipalMapper
from .selftests import KerberosSelfTests
from .tokens import TokenRefused, inspect_token

__all__ = ["KerberosPlugin", "KerberosSettings"]

#: Reasons that point at the gateway's own configuration: logged as warnings. The others are
#: the client's doing (or an attacker's) and are logged at info, the audit line has them anyway.
#: ``cross_realm_not_allowed`` is either a trust the configuration does not name or a realm's
#: administrator forging another realm's users: a warning both ways.
_OPERATOR_REASONS = frozenset({"clock_skew", "wrong_kvno", "key_mismatch", "keytab_entry_missing",
                               "wrong_principal", "unsupported_enctype", "keytab_unavailable",
                               "replay_cache_unavailable", "cross_realm_not_allowed"})
#: Of those, the ones any client can also cause at will: the ticket header (service, kvno,
#: enctype) is its own text, and a forged ticket does not decrypt. A warning at most once per
#: reason every :data:`_WARN_EVERY` seconds (per worker), the others at info: a stale keytab
#: still shows, a client cannot fill the log with warnings.
_CLIENT_CAUSABLE = frozenset({"clock_skew", "wrong_kvno", "key_mismatch", "keytab_entry_missing",
                              "wrong_principal", "unsupported_enctype"})
_WARN_EVERY = 60.0
#: The most of a refusal's detail a log line shows: GSSAPI's messages quote names from the
#: client's ticket, which may be tens of kilobytes (one such line per request).
_DETAIL_SHOWN = 2000


class KerberosSettings(PluginSettings):
    """SPNEGO single sign-on, offered only to ``allowed_networks`` (docs/plugins/kerberos.md)."""

    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        min_length=1, description="client networks (IPv4/IPv6 CIDRs) that are offered and may use Negotiate; "
                                  "the client address is the one resolved through trusted_proxies")
    keytab: ConfigPath = Field(description="the service keytab (relative to conf.d); read through an explicit "
                                           "credential store, never KRB5_KTNAME; re-read when the file changes")
    service_principal: str | None = Field(
        None, pattern=r"^[^@\s]+(@[^@\s]+)?$",
        description="accept only tickets for this principal (HTTP/host@REALM, or HTTP/host in the default "
                    "realm); unset: any key in the keytab, a key of a realm not in `realms` opening only "
                    "tickets of its own realm's principals")
    realms: list[str] = Field([], description="strip_realm allowlist: alice@REALM logs in as alice when REALM "
                                              "is listed (exact, case-sensitive)")
    rules: list[MappingRule] = Field([], description="regular-expression mapping rules, tried before realms; "
                                                     "the first whose match covers the whole principal wins")
    lowercase_username: bool = Field(False, description="lower-case the mapped username")
    require_directory_user: bool = Field(
        True, description="with a directory plugin answering gateway_lookup_user: a principal it does not "
                          "know is refused (user_not_found); false: it logs in with a bare identity")
    password_state_refuses: bool = Field(
        False, description="an expired or must-change password (as the directory reports it) also refuses "
                           "Kerberos logins; by default only disabled, locked and expired accounts do")
    replay_cache: ConfigPath | None = Field(
        None, description="MIT file2 replay cache shared by all workers; default "
                          "STATE_DIR/kerberos/replay.rcache2")

    @field_validator("allowed_networks")
    @classmethod
    def _unmapped(cls, value):
        # The core unwraps an IPv4-mapped client to IPv4 before matching: `::ffff:10.0.0.0/104`
        # never matched (review of the Kerberos plugin); it is the IPv4 network it names.
        return unmapped_networks(value)

    @model_validator(mode="after")
    def _some_mapping(self) -> KerberosSettings:
        if not self.realms and not self.rules:
            raise ValueError("set `realms` (strip_realm allowlist) or `rules`: without them no principal "
                             "maps to a username")
        return self


def _folded(name: str) -> str:
    """*name* with case and accents folded away, more loosely than any directory matches names:
    slapd lowers character by character (``İ`` to ``i``), which ``str.casefold`` does not."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


class KerberosPlugin:
    """Registered as ``kerberos``."""

    Settings = KerberosSettings
    #: What this step checks (readiness: which steps can serve password logins).
    credentials = ("negotiate",)
    #: Down or hung, this step notes UNAVAILABLE and the chain goes on (gateway/steplimit.py).
    passes_when_unavailable = True

    def __init__(self, settings: KerberosSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.context = context
        self.log = context.log
        self.networks = tuple(settings.allowed_networks)
        rcache = settings.replay_cache or Path(context.state_dir) / "kerberos" / "replay.rcache2"
        self.acceptor = Acceptor(settings.keytab, rcache, settings.service_principal)
        self.mapper = PrincipalMapper(settings.realms, settings.rules, settings.lowercase_username)
        self.cross_realm = CrossRealmPolicy(settings.realms, settings.service_principal is not None)
        self._keytab_problem = "not loaded yet"
        self._warnings = RateLimitedWarning(self.log, _WARN_EVERY)

    @property
    def loop_capable(self) -> bool:
        """Whether this step may run on the event loop (gateway/aio.py): its own work is bounded
        (GSSAPI's accept, ~100 us of C, and the local replay cache file), so it is when every
        ``gateway_lookup_user`` it calls for the profile is too (the ldap plugin's is; a third
        party's lookup may block, and then logins stay on the chain threads)."""
        return all(map(may_run_on_loop, self.context.hook.gateway_lookup_user.get_hookimpls()))

    # -- gating ---------------------------------------------------------------------------------------

    def allowed(self, attempt: Attempt) -> bool:
        """Only the core-resolved client address counts, never a header (DESIGN.md section 5)."""
        return any(attempt.client in network for network in self.networks)

    # -- hooks ----------------------------------------------------------------------------------------

    @hookimpl
    def gateway_startup(self) -> None:
        self.acceptor.rcache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.acceptor.rcache.exists() and not self.acceptor.rcache.is_file():
            # MIT would wait for ever on a FIFO's read, and fail every login on anything else.
            raise RuntimeError(f"kerberos.replay_cache {self.acceptor.rcache} is not a regular file; "
                               "remove it (MIT creates the file) or point replay_cache elsewhere")
        try:
            loaded = self.acceptor.load()
        except AcceptFailed as exc:
            self._keytab_problem = exc.detail
            raise RuntimeError(f"{exc.detail}; {exc.hint}") from None
        self._keytab_problem = ""
        self.log.info("kerberos: keytab %s loaded (%s); accepting %s from %s", self.acceptor.keytab,
                      ", ".join(loaded.index.principals), self.settings.service_principal or "any key in it",
                      ", ".join(map(str, self.networks)))

    @hookimpl
    def gateway_challenges(self, attempt: Attempt) -> str | None:
        return "Negotiate" if self.allowed(attempt) else None

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        if attempt.negotiate is None or not self.allowed(attempt):
            return None
        token = attempt.negotiate.token
        try:
            accepted = self.acceptor.accept(token, inspect_token(token), attempt.deadline)
            self._keytab_problem = ""
        except TokenRefused as exc:
            return self._refuse(attempt, exc.problem.value, exc.detail)
        except AcceptFailed as exc:
            if exc.unavailable:
                self._keytab_problem = exc.detail
                self._log(attempt, exc.reason, exc.detail)
                attempt.note(Outcome.UNAVAILABLE, step=self.name, reason=f"kerberos.{exc.reason}")
                return None
            return self._refuse(attempt, exc.reason, exc.detail)
        mapped = self.cross_realm.refusal(accepted.principal, accepted.service) or self.mapper.map(accepted.principal)
        if mapped.username is None:
            return self._refuse(attempt, mapped.reason, mapped.detail)
        identity = self._identity(attempt, mapped.username, accepted.principal)
        if not isinstance(identity, Identity):
            return identity  # None after a note, or the account-state refusal
        if accepted.output_token:
            attempt.stash[MUTUAL_AUTH_KEY] = "Negotiate " + base64.b64encode(accepted.output_token).decode("ascii")
        return Decision.allow(identity, step=self.name)

    @hookimpl
    def gateway_probe(self) -> None:
        """Re-read the keytab when it changed on disk (the acceptor compares inode, mtime and
        size) and check it still holds a key for the service principal, so that a keytab
        removed, made unreadable or replaced by one without our key shows in ``/readyz`` before
        the first Negotiate login fails (and its repair, without waiting for one)."""
        try:
            loaded = self.acceptor.load()
        except AcceptFailed as exc:
            self._keytab_problem = exc.detail
            return
        self._keytab_problem = self._missing_key(loaded.index.principals)

    def _missing_key(self, principals: list[str]) -> str:
        wanted = self.settings.service_principal
        if not principals:
            return f"keytab {self.acceptor.keytab} holds no keys"
        if wanted is None or any(p == wanted or p.split("@", 1)[0] == wanted for p in principals):
            return ""
        return f"keytab {self.acceptor.keytab} holds no key for {wanted} (it has {', '.join(principals)})"

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        problem = self._keytab_problem  # what the last probe or login found: no file I/O here
        return [ComponentState(f"{self.name}.keytab", not problem, problem or str(self.acceptor.keytab))]

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        return KerberosSelfTests(self.name, self.acceptor).tests()

    # -- helpers --------------------------------------------------------------------------------------

    def _identity(self, attempt: Attempt, username: str, principal: str) -> Identity | Decision | None:
        """The directory profile for *username*, a bare identity, an ``ACCOUNT_STATE`` refusal, or
        None after a note."""
        hook = self.context.hook.gateway_lookup_user
        claims = {"principal": principal}
        if hook.get_hookimpls():
            try:
                found = hook(username=username)
            except BackendUnavailable as exc:
                self.log.warning("kerberos: %s authenticated but the directory is unavailable (%s); attempt %s",
                                 printable(principal), exc.reason, attempt.request_id)
                attempt.note(Outcome.UNAVAILABLE, step=self.name, reason="kerberos.directory_unavailable")
                return None
            if found is not None and self._other_case(username, found.username):
                # MIT principals are case-sensitive, directories match names ignoring case:
                # ``ALICE@REALM`` is not alice unless the operator says the realm ignores case
                # (``lowercase_username``, as AD's does). Review of the Kerberos plugin.
                self.log.info("kerberos: %s maps to %r, which the directory knows as %r; refused "
                              "(lowercase_username: true if the realm ignores case, as AD's does); attempt %s",
                              printable(principal), username, found.username, attempt.request_id)
                return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name,
                                     reason="kerberos.principal_not_mapped")
            if found is not None:
                refusal = found.refusal(password_state_refuses=self.settings.password_state_refuses)
                if refusal:
                    # A ticket obtained before the account was disabled stays valid for hours:
                    # the directory's account state decides (docs/security.md).
                    self.log.info("kerberos: %s maps to %r, whose account state is %s; refused; attempt %s",
                                  printable(principal), username, refusal, attempt.request_id)
                    return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason=refusal)
                return Identity(subject=found.subject, username=found.username or username, method=self.name,
                                display_name=found.display_name, email=found.email, groups=tuple(found.groups),
                                claims={**found.claims, **claims, "directory": found.method})
            if self.settings.require_directory_user:
                self.log.info("kerberos: %s maps to %r, which no directory knows; attempt %s",
                              printable(principal), username, attempt.request_id)
                attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason="kerberos.user_not_found")
                return None
        return Identity(subject=f"kerberos:{principal}", username=username, method=self.name, claims=claims)

    def _other_case(self, username: str, known_as: str | None) -> bool:
        """Whether the directory found *username* under another spelling of the same letters (case,
        accents, ``İ`` for ``i``: what a directory's matching folds), where it may not: always,
        unless the realm ignores case (``lowercase_username``) and the two differ in case only.
        A name made by a rule that the directory answers with another attribute's value (a UPN
        looked up, the account name answered) is not another spelling, and is the directory's
        to match."""
        if not known_as or known_as == username:
            return False
        if self.settings.lowercase_username and known_as.lower() == username:  # *username* is lowered
            return False
        return _folded(known_as) == _folded(username)

    def _refuse(self, attempt: Attempt, reason: str, detail: str) -> Decision:
        self._log(attempt, reason, detail)
        return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason=f"kerberos.{reason}")

    def _log(self, attempt: Attempt, reason: str, detail: str) -> None:
        hint = HINTS.get(reason, "")
        level, since = logging.INFO, ""
        if reason in _CLIENT_CAUSABLE:
            due, skipped = self._warnings.due(reason)
            level = logging.WARNING if due else logging.INFO
            since = f" ({skipped} more at info since the last warning)" if skipped else ""
        elif reason in _OPERATOR_REASONS:
            level = logging.WARNING
        # The detail quotes GSSAPI's messages (MIT names the ticket's server in them) and the
        # client's principal: the client's own text, escaped so that it stays on this line, and
        # cut short so that a client's long names do not fill the log.
        if len(detail) > _DETAIL_SHOWN:
            detail = f"{detail[:_DETAIL_SHOWN]}... ({len(detail)} characters)"
        self.log.log(level, "kerberos.%s from %s (attempt %s): %s%s%s", reason, attempt.client,
                     attempt.request_id, printable(detail), f"; check: {hint}" if hint else "", since)

