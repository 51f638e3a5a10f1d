"""The login flows: search then bind, or direct bind; and the profile lookup without a password.

Every flow ends in a :class:`Verdict`, which the plugin turns into a decision or a note.
Directory trouble raises :class:`~gateway.plugins.ldap.pool.DirectoryUnavailable` out of here;
it is never reported as a wrong password.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import threading
import time

from dataclasses import dataclass, field
from typing import Any

from gateway import Identity, Outcome
from gateway.logs import printable
from gateway.plugins.ldap.accountstate import (ALWAYS_PRESENT, STATE_ATTRIBUTES, account_state, password_age_state,
                                               policy_dn, policy_max_age)
from gateway.plugins.ldap.adcodes import parse_data_code
from gateway.plugins.ldap.escaping import FilterTemplate, dn_value, fill, format_guid, plain_name_ok
from gateway.plugins.ldap.groups import GroupResolver
from gateway.plugins.ldap.link import TROUBLE_CODES, Entry, Link, Result, ServerTrouble
from gateway.plugins.ldap.wire import PasswordPolicy
from gateway.plugins.ldap.pool import BIND, SERVICE, Pool
from gateway.plugins.ldap.settings import LdapSettings, Resolved

__all__ = ["Directory", "Matches", "PolicyCache", "Verdict"]

_BIND_REFUSED = "ldap.bind_refused"
#: The password policy control's errors that say why a bind was refused (draft-behera section
#: 6.2), with the reason codes AD's sub-codes (adcodes.py) and the entry's state use.
_PPOLICY_REASONS = {0: "ldap.password_expired", 1: "ldap.locked", 2: "ldap.must_change_password"}
#: AD's constructed ``DOMAIN\\sAMAccountName`` of an entry, as "Who am I?" names a bound account.
_PRINCIPAL_NAME = "msDS-PrincipalName"
#: Entries a second user search reads when the first (size limit 2) found several: enough for a
#: user and a few entries only the directory's loose matching takes for them (Directory._narrowed).
_MATCH_LIMIT = 16
#: The claim of a bind ppolicy allowed by grace: the password expired (graceAuthNsRemaining).
_GRACE = "grace_logins_remaining"


#: Seconds a ppolicy entry's ``pwdMaxAge`` (or its being unreadable) is reused: policies change
#: rarely, and a change is seen by lookups this much later at most (binds see it at once).
POLICY_TTL = 300.0
#: Policy DNs remembered at most (a directory has a handful; this bounds a broken one).
POLICY_CACHE_SIZE = 256
#: Stands for a policy entry the service account could not read (absent, hidden by an ACL, not a
#: policy): the password age cannot be judged, and is not (logged once per DN).
UNREADABLE = object()


class PolicyCache:
    """``pwdMaxAge`` of ppolicy entries by DN, each for :data:`POLICY_TTL` seconds, at most
    :data:`POLICY_CACHE_SIZE` DNs (the oldest goes first). The lock guards the dict only; it
    is never held across a directory call (two lookups missing at once both read: harmless)."""

    def __init__(self, ttl: float = POLICY_TTL, size: int = POLICY_CACHE_SIZE, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._entries: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(dn: str) -> str:
        return dn.strip().lower()

    def get(self, dn: str) -> tuple[bool, object]:
        """``(True, value)`` when *dn* is known and fresh, else ``(False, None)``."""
        key = self.key(dn)
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return False, None
            if found[0] <= self.clock():
                del self._entries[key]
                return False, None
            return True, found[1]

    def put(self, dn: str, value: object) -> None:
        key = self.key(dn)
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]  # insertion order: the oldest
            self._entries[key] = (self.clock() + self.ttl, value)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a login came to. ``identity`` is set exactly for SUCCESS. ``account``: for a refusal
    by the directory of a found entry (its bind refused, or its state after a bind), the username
    that entry would have signed in as, for the credential cache (``gateway.REFUSED_ACCOUNT_KEY``); empty when no entry's bind or state refused (none found, an ambiguous name, a
    direct bind refused before its entry could be read)."""

    outcome: Outcome
    reason: str = ""
    identity: Identity | None = None
    detail: str = ""
    account: str = ""


@dataclass(frozen=True, slots=True)
class Matches:
    """What the user search found. ``more``: the server said that more entries match than it
    sent (sizeLimitExceeded), so the name is ambiguous whatever number came back."""

    entries: tuple[Entry, ...]
    more: bool = False

    @property
    def ambiguous(self) -> bool:
        return self.more or len(self.entries) > 1

    @property
    def one(self) -> Entry | None:
        """The entry, when exactly one matches; else ``None`` (none, or ambiguous)."""
        return None if self.ambiguous or not self.entries else self.entries[0]


@dataclass(slots=True)
class _Bound:
    """A user bind's result and, for direct bind, what was read as the user."""

    code: int
    message: str
    policy: PasswordPolicy | None = None
    entry: Entry | None = None
    groups: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Why ``entry`` is None: for the log.
    unread: str = ""


class Directory:
    def __init__(self, name: str, settings: LdapSettings, resolved: Resolved, pool: Pool,
                 groups: GroupResolver, log) -> None:
        self.name = name
        self.s = settings
        self.r = resolved
        self.pool = pool
        self.groups = groups
        self.log = log
        self._scope = settings.scope
        # The state attributes ride along with every user search (lookups must report them).
        self._attributes = list(resolved.user_attributes) + [
            a for a in STATE_ATTRIBUTES if a.lower() not in {u.lower() for u in resolved.user_attributes}]
        self._always_present = ALWAYS_PRESENT.get(settings.preset, ())
        #: ppolicy entries' pwdMaxAge, for the password age of lookups (password_age_state).
        self.policies = PolicyCache()
        #: What was logged once (an unreadable policy, no default policy), bounded.
        self._told: set[str] = set()
        #: The user filter with ``{username}`` filled, as BER (escaping.FilterTemplate).
        self._user_filter = FilterTemplate(resolved.user_filter)
        #: Bound by ``_equalizing_bind``; random per process, so no entry can be made to match it.
        self._nobody_dn = f"cn=authgw-no-such-user-{secrets.token_hex(8)},{settings.base_dn}"
        direct = settings.direct_bind or ""
        #: A direct-bind template that is a DN gets RFC 4514 escaping; any other (a UPN or
        #: DOMAIN\\name) only accepts names without syntax characters.
        self._direct_is_dn = "=" in direct.split("{username}", 1)[0]
        #: What a "Who am I?" entry is read with: AD's own DOMAIN\\name for it too (_bound_entry).
        #: The directory answered an entry without msDS-PrincipalName at a base read: it has
        #: none (not AD), and no later login pays that read (_principal_name).
        self._no_principal_name = False
        self._who_attributes = tuple(self._attributes) + (
            () if _PRINCIPAL_NAME.lower() in {a.lower() for a in self._attributes} else (_PRINCIPAL_NAME,))

    # -- finding users --------------------------------------------------------------------------

    def find(self, link: Link, username: str) -> Matches:
        # Size limit 2: one entry is the answer, two are enough to know it is ambiguous.
        result, entries, _ = link.search(self.s.base_dn, self._user_filter(username), self._attributes,
                                         scope=self._scope, size_limit=2)
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"user search answered {result.code}: {result.message}")
        if result.code == 4:
            # sizeLimitExceeded: more entries match than were sent. Under the size limit of 2
            # asked here that is two or more, ambiguous; a server whose own limit is lower
            # (slapd's sizelimit 1) sends one entry with it, which is not the only match.
            return self._narrowed(link, username, Matches(tuple(entries), more=True))
        if result.code != 0:
            # An errored search (noSuchObject, insufficientAccessRights, timeLimitExceeded...) may
            # be incomplete: its entries never make a match.
            self.log.warning("user search for %r under %s answered %d: %s",
                             username, self.s.base_dn, result.code, result.message)
            return Matches(())
        if len(entries) > 1:
            return self._narrowed(link, username, Matches(tuple(entries)))
        return Matches(tuple(entries))

    def _narrowed(self, link: Link, username: str, matches: Matches) -> Matches:
        """Of several matches, the one entry whose login name is *username* in its one spelling
        (:meth:`Entry.spelt_as`), when exactly one is; else *matches*, ambiguous.

        The directory matches loosely (RFC 4518: white space at the ends and doubled inside is
        insignificant, compatibility forms fold), so an entry anyone may create with the uid
        ``admin `` matched ``(uid=admin)`` too, and the administrator was refused (items left by
        the review of the LDAP plugin). Such a name is never signed in (no header can carry it,
        ``gateway.chain._vetted``), so its entry cannot be the user. A case variant (``ADMIN``)
        is spelt so: two users, refused, since an application behind may not tell them apart.
        Matches the server cut short are read again, up to :data:`_MATCH_LIMIT`, and refused
        when even those are not all: off the hot path (one entry matches a login)."""
        if matches.more:
            result, entries, _ = link.search(self.s.base_dn, self._user_filter(username), self._attributes,
                                             scope=self._scope, size_limit=_MATCH_LIMIT)
            if result.code in TROUBLE_CODES:
                raise ServerTrouble(f"user search answered {result.code}: {result.message}")
            if result.code != 0:  # still more than were sent, or an errored search: unknown
                return matches
            matches = Matches(tuple(entries))
        named = tuple(entry for entry in matches.entries if entry.spelt_as(self.r.username_attr, username))
        if len(named) != 1:
            return matches
        others = [printable(entry.dn) for entry in matches.entries if entry is not named[0]]
        self._tell_once(f"narrowed {named[0].dn.lower()}",
                        "username %r matches %d entries under %s; only %s has it as %s in its one spelling and is "
                        "the user; the others (%s) are not signed in by this name", username,
                        len(matches.entries), self.s.base_dn, printable(named[0].dn), self.r.username_attr,
                        "; ".join(others)[:1000])
        return Matches(named)

    def search_user(self, username: str, deadline: float) -> Matches:
        return self.pool.call(SERVICE, lambda link: self.find(link, username), deadline)

    # -- logging in -----------------------------------------------------------------------------

    def login(self, username: str, password: str, deadline: float) -> Verdict:
        if self.s.direct_bind is not None:
            return self._direct_login(username, password, deadline)
        matches = self.search_user(username, deadline)
        if matches.ambiguous:
            self.log.warning("username %r matches several entries under %s; refused", username, self.s.base_dn)
            return Verdict(Outcome.INVALID_CREDENTIALS, "ldap.ambiguous_user")
        entry = matches.one
        if entry is None:
            self._equalizing_bind(deadline)
            return Verdict(Outcome.USER_NOT_FOUND, "ldap.user_not_found")
        if self.ambiguously_named(entry, username):
            return Verdict(Outcome.INVALID_CREDENTIALS, "ldap.ambiguous_user")
        bound = self.pool.call(BIND, lambda link: self._bind(link, entry.dn, password), deadline)
        verdict, extra = self._judge(bound, username)
        if verdict is not None:
            # The bind of this entry's DN was refused: the refusal is this account's.
            return dataclasses.replace(verdict, account=self.signed_in_as(entry, username))
        state, _ = account_state(entry)
        if state:
            # The password was right, but a directory that does not enforce its own flags on
            # binds (nsAccountLock without the 389-DS plugin, an expired accountExpires read
            # before AD's replication caught up) still says no: the same answer as every path.
            self.log.info("%r bound but the entry says %s; refused", username, state)
            return Verdict(Outcome.ACCOUNT_STATE, state, account=self.signed_in_as(entry, username))
        unreadable = self.unreadable_state(entry)
        if bound.code != 0 and unreadable:
            # AD refused this bind (532/773) and allow_expired_password or
            # allow_must_change_password lets it through: no bind vouched for the account, only
            # the entry can, and AD's order of checks is not documented to answer 533 (disabled)
            # first. A state the service account cannot read is not "enabled": refused, as a
            # lookup and the direct bind refuse it.
            self.log.warning("%r: AD answered %s, let through by the operator, but the entry has no %s; the service "
                             "account may not read it; refused as ldap.account_state_unreadable", username,
                             printable(bound.message[:120]), ", ".join(unreadable))
            return Verdict(Outcome.ACCOUNT_STATE, "ldap.account_state_unreadable",
                           account=self.signed_in_as(entry, username))
        groups = self.groups.known(entry)
        if groups is None:
            groups = self.pool.call(SERVICE, lambda link: self.groups.resolve(link, entry, username), deadline)
        return self._success(entry, username, groups, extra)

    def unreadable_state(self, entry: Entry) -> list[str]:
        """The state attributes the preset's directory always carries that *entry* came without
        (:data:`~gateway.plugins.ldap.accountstate.ALWAYS_PRESENT`): not read, so unknown."""
        return [attr for attr in self._always_present if not entry.get(attr)]

    def _success(self, entry: Entry, username: str, groups: tuple[str, ...], extra: dict[str, Any]) -> Verdict:
        identity = self.identity(entry, username, groups, extra)
        if _GRACE in extra:
            # ppolicy let an expired password bind by grace (pwdGraceAuthNLimit), a login slapd
            # counts. Said as the password's state: the credential cache neither keeps nor repeats
            # such a login (a repeat must spend a grace bind, or the limit would not hold).
            identity = dataclasses.replace(identity, password_state="ldap.password_expired")
        return Verdict(Outcome.SUCCESS, identity=identity)

    def ambiguously_named(self, entry: Entry, username: str) -> bool:
        """*entry* has several login names and *username* is none of them (it was found by its
        mail), or two: which one it signs in as is unknown. The first was taken, and the
        directory's order of values is no rule: ``uid: [admin, eve]`` found by eve's mail signed
        in as ``admin`` (items left by the review of the LDAP plugin). Refused, logged."""
        if not entry.names_ambiguously(self.r.username_attr, username):
            return False
        self.log.warning("%r found %s, whose %s has several values and names none of them (or several); "
                         "which one is the user is unknown; refused as ldap.ambiguous_user", username,
                         printable(entry.dn), self.r.username_attr)
        return True

    def _equalizing_bind(self, deadline: float) -> None:
        """Spend the bind an existing user would cost, so that an unknown user and a wrong
        password take the same directory round trips (uniform failures, DESIGN.md section 7).
        The DN cannot exist and the password is random: the user's password is not sent."""
        try:
            self.pool.call(BIND, lambda link: link.bind(self._nobody_dn, secrets.token_urlsafe(18)), deadline)
        except Exception:  # noqa: BLE001 - the answer is USER_NOT_FOUND whatever happens here
            pass

    def _bind(self, link: Link, dn: str, password: str) -> _Bound:
        result = link.bind(dn, password)
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"bind answered {result.code}: {result.message}")
        return _Bound(result.code, result.message, result.policy)

    def _judge(self, bound: _Bound, username: str) -> tuple[Verdict | None, dict[str, Any]]:
        """``(None, claims)`` when the bind lets the user in, else the refusing verdict.

        Only the bind's result code can let a user in; a password policy control refines a
        refusal into its account state, or refuses a bind that succeeded in a restricted state
        (ppolicy's changeAfterReset: the connection may only change the password)."""
        policy = bound.policy
        error = policy.error if policy is not None else None
        if bound.code == 0:
            if error == 2 and self.s.allow_must_change_password:
                return None, {"must_change_password": True}
            if error in _PPOLICY_REASONS:
                self.log.info("bind of %r succeeded but the password policy says %s; refused",
                              username, _PPOLICY_REASONS[error])
                return Verdict(Outcome.ACCOUNT_STATE, _PPOLICY_REASONS[error], detail=f"ppolicy {error}"), {}
            return None, self._policy_warnings(policy, username)
        if bound.code != 49:  # not invalidCredentials: a policy refused (unwillingToPerform...)
            self.log.info("bind of %r refused with result %d: %s", username, bound.code, bound.message)
            return Verdict(Outcome.INVALID_CREDENTIALS, _BIND_REFUSED, detail=str(bound.code)), {}
        ad = parse_data_code(bound.message)
        if ad is None and error in _PPOLICY_REASONS:
            # ppolicy: a bare 49 plus the reason in the control (accountLocked only when slapd
            # has ppolicy_use_lockout; else a locked account stays ldap.invalid_password).
            self.log.info("bind of %r refused by the password policy: %s", username, _PPOLICY_REASONS[error])
            return Verdict(Outcome.ACCOUNT_STATE, _PPOLICY_REASONS[error], detail=f"ppolicy {error}"), {}
        if ad is None:
            return Verdict(Outcome.INVALID_CREDENTIALS, "ldap.invalid_password"), {}
        if ad.code == "532" and self.s.allow_expired_password:
            return None, {"password_expired": True}
        if ad.code == "773" and self.s.allow_must_change_password:
            return None, {"must_change_password": True}
        if ad.outcome is Outcome.ACCOUNT_STATE:
            self.log.info("AD refused %r: %s (data %s)", username, ad.meaning, ad.code)
        return Verdict(ad.outcome, ad.reason, detail=ad.code), {}

    def _policy_warnings(self, policy: PasswordPolicy | None, username: str) -> dict[str, Any]:
        """A successful bind's expiry warnings, as claims (a login page may tell the user); they
        never change the decision."""
        if policy is None:
            return {}
        claims: dict[str, Any] = {}
        if policy.time_before_expiration is not None:
            claims["password_expires_in"] = policy.time_before_expiration
        if policy.grace_authns_remaining is not None:
            claims[_GRACE] = policy.grace_authns_remaining
        if claims:
            self.log.info("password of %r: %s", username, claims)
        return claims

    def _direct_login(self, username: str, password: str, deadline: float) -> Verdict:
        template = self.s.direct_bind or ""
        if self._direct_is_dn:
            bind_name = template.replace("{username}", dn_value(username))
        elif plain_name_ok(username):
            bind_name = template.replace("{username}", username)
        else:
            return Verdict(Outcome.USER_NOT_FOUND, "ldap.user_not_found")
        bound = self.pool.call(BIND, lambda link: self._direct_bind(link, bind_name, username, password), deadline)
        verdict, extra = self._judge(bound, username)
        entry = bound.entry
        if verdict is not None:
            # A bind refused outright names no entry (none was read); one that succeeded and was
            # refused by its password policy read the entry it opened, by the server's word.
            if entry is not None and not entry.names_ambiguously(self.r.username_attr, username):
                return dataclasses.replace(verdict, account=self.signed_in_as(entry, username))
            return verdict
        unreadable = self.unreadable_state(entry) if entry is not None else []
        if entry is None or unreadable:
            # The password was right, but whose entry it opens (and its flags) is unknown: a
            # directory that does not enforce its own flags on binds would let a disabled
            # account in. Refused, as a lookup refuses a state it cannot read.
            self.log.warning("%r bound as %r, but %s; refused as ldap.account_state_unreadable", username, bind_name,
                             printable(bound.unread or f"the entry has no {', '.join(unreadable)}"))
            return Verdict(Outcome.ACCOUNT_STATE, "ldap.account_state_unreadable")
        if self.ambiguously_named(entry, username):
            return Verdict(Outcome.INVALID_CREDENTIALS, "ldap.ambiguous_user")
        state, _ = account_state(entry)
        if state:  # as in login(): the entry's flags refuse even a right password
            self.log.info("%r bound but the entry says %s; refused", username, state)
            # The entry the bind opened (Who am I?): without a service account no lookup can
            # name the account of a UPN, and its rows under its own name must go (the cache).
            return Verdict(Outcome.ACCOUNT_STATE, state, account=self.signed_in_as(entry, username))
        groups = bound.groups
        if groups is None:
            groups = self.pool.call(SERVICE, lambda link: self.groups.resolve(link, entry, username), deadline)
        return self._success(entry, username, groups, extra)

    def _direct_bind(self, link: Link, bind_name: str, username: str, password: str) -> _Bound:
        """Bind as the user, then read the profile (and groups) over the same connection."""
        bound = self._bind(link, bind_name, password)
        if bound.code != 0:
            bound.unread = f"the bind answered {bound.code}, so the entry was not read"
            return bound
        if self._direct_is_dn:
            result, entries, _ = link.search(bind_name, "(objectClass=*)", self._attributes, scope="base")
            where = bind_name
        else:
            result, entries, where = self._bound_entry(link)
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"reading the bound entry answered {result.code}: {result.message}")
        if not result.ok or len(entries) != 1:
            bound.unread = (f"reading {where} as the user answered {result.code} ({result.message}) "
                            f"with {len(entries)} entries")
            return bound
        bound.entry = entries[0]
        bound.groups = self.groups.known(bound.entry)
        if bound.groups is None and self.s.bind_dn is None:
            bound.groups = self.groups.resolve(link, bound.entry, username)
        return bound

    def _bound_entry(self, link: Link) -> tuple[Result, list[Entry], str]:
        """The entry of the identity *link* is bound as, by the server's word (RFC 4532 "Who am
        I?"), never by the name typed: AD binds ``jdoe@corp`` to the account whose UPN that is,
        and ``jdoe`` may be another account's sAMAccountName (a renamed user), which a search
        with the user filter would find instead. AD names the identity ``u:DOMAIN\\name``."""
        result, authz = link.who_am_i()
        if not result.ok:
            return result, [], "the identity (Who am I?)"
        kind, _, name = authz.partition(":")
        if kind == "dn" and name:
            found, entries, _ = link.search(name, "(objectClass=*)", self._attributes, scope="base")
            return found, entries, name
        account = name.rpartition("\\")[2]
        if kind == "u" and "\\" in name and plain_name_ok(account):
            query = fill("(sAMAccountName={username})", username=account)
            found, entries, _ = link.search(self.s.base_dn, query, self._who_attributes, scope=self._scope,
                                            size_limit=2)
            where = f"{query} under {self.s.base_dn}"
            if found.ok and len(entries) == 1:
                # A sAMAccountName is unique in its domain only: a DC binds the UPN of a user of
                # another domain of the forest (EU\\jsmith), and a search of this domain for
                # "jsmith" finds CORP\\jsmith, another person, whose profile and groups that login
                # got (review of the LDAP plugin). The entry must be the one the server named.
                principal = self._principal_name(link, entries[0])
                if principal is not None and principal.casefold() != name.casefold():
                    return Result(0, ""), [], f"{where}, which found {principal!r}, not {name!r} (another domain's)"
            return found, entries, where
        # anonymous (empty), or a user id this gateway cannot turn into an entry
        return Result(0, ""), [], f"the identity {authz!r} (Who am I?)"

    def _principal_name(self, link: Link, entry: Entry) -> str | None:
        """AD's ``DOMAIN\\sAMAccountName`` of *entry* (``msDS-PrincipalName``, constructed: read
        again at the entry when the search left it out), or ``None`` from a directory without it
        (found once: a base read that returns the entry without it is not made again)."""
        values = entry.get(_PRINCIPAL_NAME)
        if not values and not self._no_principal_name:
            result, entries, _ = link.search(entry.dn, "(objectClass=*)", (_PRINCIPAL_NAME,), scope="base")
            if result.code in TROUBLE_CODES:
                raise ServerTrouble(f"reading {_PRINCIPAL_NAME} answered {result.code}: {result.message}")
            values = entries[0].get(_PRINCIPAL_NAME) if result.ok and len(entries) == 1 else []
            if result.ok and len(entries) == 1 and not values:
                self._no_principal_name = True
        return _text(values[0]) if values else None

    # -- profile ----------------------------------------------------------------------------------

    def lookup(self, username: str, deadline: float) -> Identity | None:
        matches = self.search_user(username, deadline)
        entry = matches.one
        if entry is None:
            if matches.ambiguous:
                self.log.warning("lookup of %r matches several entries; answered as unknown", username)
            return None
        if self.ambiguously_named(entry, username):
            return None
        state, password_state = account_state(entry)
        unreadable = self.unreadable_state(entry)
        if unreadable and not state:
            # A lookup answers for logins that bind no password: the directory never judges
            # them, so a state the service account cannot read must not pass for "enabled".
            self.log.warning("lookup of %r: the entry has no %s; the service account may not read it; "
                             "refused as ldap.account_state_unreadable", username, ", ".join(unreadable))
            state = "ldap.account_state_unreadable"
        if state:
            # Refused anyway: no group search (and no policy read); the caller answers ACCOUNT_STATE.
            return dataclasses.replace(self.identity(entry, username, (), {}), account_state=state,
                                       password_state=password_state)
        if not password_state:
            password_state = self.password_age(entry, deadline)
        groups = self.groups.known(entry)
        if groups is None:
            groups = self.pool.call(SERVICE, lambda link: self.groups.resolve(link, entry, username), deadline)
        return dataclasses.replace(self.identity(entry, username, groups, {}), password_state=password_state)

    def password_age(self, entry: Entry, deadline: float) -> str:
        """OpenLDAP ppolicy's expiry of the entry's password (``ldap.password_expired``) or ``""``:
        ``pwdChangedTime`` against the ``pwdMaxAge`` of the policy in effect, the entry named by
        ``pwdPolicySubentry``, else ``ppolicy_default``. A password bind is judged by slapd; a
        lookup binds no password, so it must judge the age itself, as slapd would.

        Costs nothing for an entry without ``pwdChangedTime`` (slapd: such a password never
        expires) and one base search per policy every :data:`POLICY_TTL` seconds otherwise.
        Directory trouble raises (DirectoryUnavailable: the lookup fails closed); a policy the
        service account cannot read leaves the age unjudged, logged once per DN."""
        if not entry.get("pwdChangedTime"):
            return ""
        dn = policy_dn(entry) or self.s.ppolicy_default
        if dn is None:
            self._tell_once("no default", "%s carries pwdChangedTime but no pwdPolicySubentry, and ppolicy_default "
                            "is not set: the password age of users under the overlay's default policy is not judged "
                            "on lookups (Kerberos, certificates); set ldap.ppolicy_default to its DN", printable(entry.dn))
            return ""
        found, max_age = self.policies.get(dn)
        if not found:
            max_age = self.pool.call(SERVICE, lambda link: self._read_policy(link, dn), deadline)
            self.policies.put(dn, max_age)
        if max_age is UNREADABLE:
            return ""
        return password_age_state(entry, max_age)  # type: ignore[arg-type]

    def _read_policy(self, link: Link, dn: str) -> object:
        """The policy entry's pwdMaxAge (policy_max_age), or UNREADABLE."""
        result, entries, _ = link.search(dn, "(objectClass=*)", ["pwdMaxAge", "pwdAttribute"], scope="base")
        if result.code in TROUBLE_CODES:
            raise ServerTrouble(f"reading the password policy {printable(dn)} answered {result.code}: {result.message}")
        # pwdAttribute is a MUST of pwdPolicy: an entry without it is not a policy, or one whose
        # attributes the service account may not read (then pwdMaxAge would look "not set").
        if result.code != 0 or len(entries) != 1 or not entries[0].get("pwdAttribute"):
            self._tell_once(f"policy {PolicyCache.key(dn)}",
                            "the password policy %s could not be read by the service account (answered %d %s with "
                            "%d entries, pwdAttribute %s): the password age of its users is not judged on lookups "
                            "(Kerberos, certificates); let the service account read it (pwdMaxAge, pwdAttribute)",
                            printable(dn), result.code, printable(result.message), len(entries),
                            "readable" if entries and entries[0].get("pwdAttribute") else "not seen")
            return UNREADABLE
        return policy_max_age(entries[0])

    def _tell_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._told:
            return
        if len(self._told) < 1000:
            self._told.add(key)
        self.log.warning(message, *args)

    def identity(self, entry: Entry, username: str, groups: tuple[str, ...], extra: dict[str, Any]) -> Identity:
        claims: dict[str, Any] = {"dn": entry.dn}
        for claim, attrs in self.r.claims:
            for attr in attrs:
                values = entry.get(attr)
                if values:
                    texts = [claim_text(attr, v) for v in values]
                    claims[claim] = texts[0] if len(texts) == 1 else texts
                    break
        claims.update(extra)
        display = ""
        for attr in self.r.display_name_attrs:
            display = _first(entry, attr)
            if display:
                break
        return Identity(
            subject=self._subject(entry),
            username=self.signed_in_as(entry, username),
            method=self.name,
            display_name=display,
            email=_first(entry, self.r.email_attr),
            groups=groups,
            claims=claims,
        )

    def signed_in_as(self, entry: Entry, username: str) -> str:
        """The username *entry*, found or bound under *username*, signs in as."""
        return entry.login_name(self.r.username_attr, username) or username

    def _subject(self, entry: Entry) -> str:
        values = entry.get(self.r.subject_attr)
        if not values:
            return f"dn:{entry.dn}"
        if self.r.subject_attr.lower() == "objectguid":
            try:
                return format_guid(values[0])
            except ValueError:
                pass
        return _text(values[0])


#: Attributes whose values are binary (RFC 4523 certificates, AD SIDs and photos): claims carry
#: them base64-encoded, so a DER certificate survives for the client_cert plugin's directory match.
BINARY_ATTRIBUTES = frozenset({"usercertificate", "cacertificate", "crosscertificatepair", "objectsid",
                               "jpegphoto", "thumbnailphoto", "objectguid"})


def claim_text(attr: str, value: bytes | str) -> str:
    """A claim value as text: UTF-8 for text attributes, base64 for binary ones (by name, by the
    ``;binary`` option, or when the value is not UTF-8)."""
    if isinstance(value, str):
        return value
    name = attr.lower()
    if ";binary" not in name and name not in BINARY_ATTRIBUTES:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return base64.b64encode(value).decode("ascii")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else value


def _first(entry: Entry, attr: str) -> str:
    values = entry.get(attr)
    return _text(values[0]) if values else ""
