"""The request/decision model every front door and plugin speaks.

Frozen dataclasses: an attempt's credentials and a decision cannot be changed after they are
made. Fields that hold secrets are excluded from ``repr`` so that a stray ``log.debug(attempt)``
or a traceback never prints a password or a token.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.stash import Stash, StashKey

__all__ = [
    "Attempt",
    "CertificateCredential",
    "Decision",
    "Identity",
    "API_CLIENT_KEY",
    "FORWARDED_CERTIFICATE_KEY",
    "MUTUAL_AUTH_KEY",
    "REFUSED_ACCOUNT_KEY",
    "NegotiateCredential",
    "Note",
    "Outcome",
    "PasswordCredential",
    "SessionCredential",
    "UserPage",
    "address_text",
    "canonical_username",
    "folded_username",
    "plainly_spelt",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def address_text(address: IPAddress) -> str:
    """``str(address)``, remembered for the few addresses that repeat (proxies, a site's NAT):
    :mod:`ipaddress` formats in Python, several times the cost of this look-up, and the hot
    path needs the text twice per attempt (the hot cache's key, the audit line)."""
    return str(address)


class Outcome(enum.Enum):
    """What an attempt came to. The values are the stable names used in JSON and the audit log."""

    SUCCESS = "success"
    INVALID_CREDENTIALS = "invalid_credentials"
    USER_NOT_FOUND = "user_not_found"
    ACCOUNT_STATE = "account_state"
    UNAVAILABLE = "unavailable"
    NOT_APPLICABLE = "not_applicable"
    #: A plugin raised; the core denied (fail closed). See docs/design.md for why this is not
    #: folded into INVALID_CREDENTIALS.
    ERROR = "error"
    #: The core refused to run the chain: too many recent failures for this user or client.
    THROTTLED = "throttled"


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------


def canonical_username(name: str) -> str:
    """The one spelling of a presented username that the core, the throttle and the caches use.

    NFKC (full-width ``ｂｏｂ`` is ``bob``, a no-break space is a space), format characters such as
    a zero-width space dropped, and white space trimmed at both ends and collapsed inside: what
    slapd's and Active Directory's string matching (RFC 4518 insignificant space handling)
    already treat as the same name. Case is kept: whether ``Bob`` is ``bob`` is the identity
    source's rule (LDAP and AD ignore case, ``static`` has ``case_insensitive``); keys that must
    not tell spellings apart use :attr:`Attempt.user_key`, which also folds case.
    """
    name = unicodedata.normalize("NFKC", name)
    if not name.isascii():
        name = "".join(ch for ch in name if unicodedata.category(ch) != "Cf")
    return " ".join(name.split())


def folded_username(name: str) -> str:
    """The key under which every spelling of one name meets, case included: the throttle's
    budget (:attr:`Attempt.user_key`), the credential cache's row and hot entries. At least as
    loose as the directories' own matching, or a spelling they take for the account would get a
    budget, and a cache row, of its own: :func:`canonical_username`, then ``İ`` (U+0130) read as
    ``I``, then case-folded. ``str.casefold`` turns ``İ`` into ``i`` and a combining dot above,
    while slapd lowers it to ``i`` and binds ``alİce`` as ``alice``: every ``i`` of a name
    doubled the throttle's budget, and a refusal seen under ``alice`` left ``alİce``'s offline
    row answering (review of the forward-auth door). Only that letter: a fold that also drops
    accents would merge other users' names. Then NFKC again: case folding decomposes some
    letters (``ΐ`` folds to three code points, ``Ϊ́``, its capital, to two), which slapd takes for
    one name; a name holding one had two budgets (second review of the front door)."""
    name = canonical_username(name)
    if name.isascii():
        return name.casefold()
    return unicodedata.normalize("NFKC", name.replace("\u0130", "I").casefold())


def plainly_spelt(name: str) -> bool:
    """Whether *name* is already in its one spelling (:func:`canonical_username`) and holds no
    control character: what a name that is the whole credential (a certificate's, a Kerberos
    principal's) must be. Directories match names loosely (OpenLDAP's caseIgnoreMatch folds
    compatibility forms and white space), so such a name spelt otherwise, ``ａｌｉｃｅ``
    (full-width) or ``alice`` with a no-break space, would be another user's."""
    return name == canonical_username(name) and not any(unicodedata.category(ch)[0] == "C" for ch in name)


@dataclass(frozen=True, slots=True)
class PasswordCredential:
    """A username and password. The username is canonicalised on construction
    (:func:`canonical_username`), so no plugin ever sees another spelling."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        canonical = canonical_username(self.username)
        if canonical != self.username:
            object.__setattr__(self, "username", canonical)


@dataclass(frozen=True, slots=True)
class SessionCredential:
    """A signed-in session of the login door, about to answer a service again (single sign-on):
    the user it was signed in as. Not a secret, and no chain step accepts it: the session's
    identity answers unless a step or a wrapper refuses (the login door sets that answer;
    :data:`gateway.chain.AFTER_THE_CHAIN`), so policies see session reuse as they see sign-ins."""

    username: str

    def __post_init__(self) -> None:
        canonical = canonical_username(self.username)
        if canonical != self.username:
            object.__setattr__(self, "username", canonical)


@dataclass(frozen=True, slots=True)
class NegotiateCredential:
    """The decoded token of an ``Authorization: Negotiate`` header (SPNEGO, RFC 4559)."""

    token: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CertificateCredential:
    """A client certificate chain, leaf first, DER encoded.

    ``source`` is ``"tls"`` when this gateway's own TLS listener verified the handshake, or
    ``"header"`` when a trusted TLS-terminating proxy forwarded it (then nothing has verified the
    chain yet and the plugin must).
    """

    chain: tuple[bytes, ...] = field(repr=False)
    source: str = "tls"

    @property
    def leaf(self) -> bytes:
        return self.chain[0]


# ---------------------------------------------------------------------------------------------
# Attempt
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Note:
    """A step's remark about an attempt it passed on (USER_NOT_FOUND or UNAVAILABLE).

    ``offline``: whether a cache may answer for the step (an UNAVAILABLE note); false when its
    backend's own side already gave what offline answer it could (a relay's connector that
    answered that its directory is down).

    ``answered_by``: which of the step's backends answered, when the step knows it and it matters
    (:attr:`Decision.answered_by`); it stays with the note into the folded decision."""

    outcome: Outcome
    step: str
    reason: str
    offline: bool = True
    answered_by: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class Attempt:
    """One login attempt, as a front door saw it.

    :ivar request_id: unique id, also in the audit line and the ``X-Request-Id`` response header.
    :ivar client: the client address, already resolved through trusted proxies.
    :ivar front_door: which entry point it came through (``forward_auth``, ``api``, ...).
    :ivar deadline: :func:`time.monotonic` value by which a decision is due.
    :ivar password: the username and password presented (Basic, or the JSON API), if any.
    :ivar negotiate: the SPNEGO/Kerberos token presented (``Authorization: Negotiate``), if any.
    :ivar certificate: the client certificate chain (own TLS listener or a trusted proxy), if any.
    :ivar session: the login door's signed-in session being reused (single sign-on), if any.
    :ivar peer: the socket peer's address (equal to ``client`` unless a trusted proxy forwarded).
    :ivar trusted_peer: the socket peer is one of ``trusted_proxies``: headers it forwards (such
        as a client certificate) may be believed.
    :ivar headers: the request's headers, lower-cased names, without ``Authorization``,
        ``Proxy-Authorization`` and ``Cookie`` (credentials arrive typed, above).
    :ivar started: :func:`time.monotonic` value when the front door built it (latency).
    :ivar stash: per-attempt plugin state, under module-level ``StashKey`` keys.
    :ivar notes: what steps that passed on remarked (``USER_NOT_FOUND``, ``UNAVAILABLE``); the
        core folds them when no step decides.
    """

    request_id: str
    client: IPAddress
    front_door: str
    deadline: float
    password: PasswordCredential | None = None
    negotiate: NegotiateCredential | None = None
    certificate: CertificateCredential | None = None
    session: SessionCredential | None = None
    peer: IPAddress | None = None
    trusted_peer: bool = False
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    started: float = field(default_factory=time.monotonic, repr=False)
    stash: Stash = field(default_factory=Stash, repr=False)
    notes: list[Note] = field(default_factory=list, repr=False)

    @property
    def username(self) -> str | None:
        """The username presented with a password, or the user of a reused session, canonicalised
        (for logs and plugins)."""
        if self.password is not None:
            return self.password.username
        return self.session.username if self.session is not None else None

    @property
    def user_key(self) -> str | None:
        """The username as throttling keys it (:func:`folded_username`), so that no spelling of
        one name (``bob``, ``" BOB"``, ``ｂｏｂ``, ``bİll``) gets a budget of its own."""
        if self.password is None:
            return None
        name = self.password.username  # canonical already (PasswordCredential)
        return name.casefold() if name.isascii() else folded_username(name)  # ASCII: nothing else to fold

    def time_left(self) -> float:
        """Seconds until the deadline (never negative); size backend timeouts from this."""
        return max(0.0, self.deadline - time.monotonic())

    def note(self, outcome: Outcome, *, step: str, reason: str, offline: bool = True,
             answered_by: str = "") -> None:
        """Record that step *step* passes this attempt on because of *outcome*.

        Only :attr:`Outcome.USER_NOT_FOUND` and :attr:`Outcome.UNAVAILABLE` are notes; the core
        folds them into the result when no step decides (DESIGN.md section 3). ``offline=False``
        on an UNAVAILABLE note: no cache answers for this step (see :class:`Note`).
        ``answered_by``: the backend that answered so (:attr:`Decision.answered_by`).
        """
        if outcome not in (Outcome.USER_NOT_FOUND, Outcome.UNAVAILABLE):
            raise ValueError(f"only USER_NOT_FOUND and UNAVAILABLE can be noted, not {outcome}")
        self.notes.append(Note(outcome, step, reason, offline, answered_by))


#: A step that completes a mutual authentication (Kerberos) stores here the ``WWW-Authenticate``
#: value the front door sends with its 200 answer (RFC 4559 section 5).
MUTUAL_AUTH_KEY: StashKey[str] = StashKey()

#: A step whose directory refused a found account (its password or its state) names the account
#: here: step name -> the username a success of that account would have carried. A wrapper that
#: keeps rows under usernames (the credential cache) reaches the account's rows with it when the
#: name refused was another of the account's (its mail, its UPN), with no second lookup. Only a
#: step's own directory's refusal of that very entry may be named: the cache forgets on its word.
REFUSED_ACCOUNT_KEY: StashKey[dict[str, str]] = StashKey()

#: A step that read a client certificate a trusted proxy forwarded in a header (not the TLS
#: handshake's, :attr:`Attempt.certificate`) sets this, so that the audit line's ``method``
#: says a certificate was presented (``none`` before: a search for certificate logins missed
#: every proxied one).
FORWARDED_CERTIFICATE_KEY: StashKey[bool] = StashKey()

#: The name (``api_tokens[].name``) of the API token a ``/v1/authenticate`` attempt came with,
#: for the audit line's ``api_client``: which service made the call.
API_CLIENT_KEY: StashKey[str] = StashKey()

# ---------------------------------------------------------------------------------------------
# Identity and decision
# ---------------------------------------------------------------------------------------------


def _plain_claims(claims: Mapping[str, Any]) -> bool:
    """Whether *claims* hold texts and lists of texts under text keys only (the LDAP plugin's
    ``attributes:``): JSON as they are, without the cost of writing them (issue 15)."""
    for key, value in claims.items():
        if type(key) is not str:
            return False
        if type(value) is not str and not (type(value) in (list, tuple) and all(type(v) is str for v in value)):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a successful attempt proved the client to be.

    :ivar subject: a stable id that survives renames (for AD, the objectGUID).
    :ivar username: the name upstream applications see (``Remote-User``): the backend's spelling.
    :ivar display_name: a human name (``Remote-Name``), empty when unknown.
    :ivar email: ``Remote-Email``, empty when unknown.
    :ivar groups: group names (``Remote-Groups``), nested memberships resolved.
    :ivar claims: further attributes a plugin maps (LDAP ``attributes:``), JSON-safe values.
    :ivar method: the plugin that proved it (``ldap``, ``kerberos``, ``static``...).
    :ivar authenticated_at: wall-clock time (:func:`time.time`) of the proof.
    :ivar account_state: set by a ``gateway_lookup_user`` answer when the account may not log in
        whatever the credential: the reason code the password path uses (``ldap.disabled``,
        ``ldap.locked``, ``ldap.account_expired``, ``static.disabled``); empty when usable.
        Methods without a password (Kerberos, certificates) refuse with ``ACCOUNT_STATE``.
    :ivar password_state: the account's password may not be used (``ldap.password_expired``,
        ``ldap.must_change_password``); a method without a password decides by configuration.
    """

    subject: str
    username: str
    method: str
    display_name: str = ""
    email: str = ""
    groups: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    authenticated_at: float = field(default_factory=time.time)
    account_state: str = ""
    password_state: str = ""

    def shape_error(self) -> str:
        """What no header, token or audit line could carry faithfully in a plugin's identity,
        in a few words; ``""`` when it has the documented shape (text fields, groups a tuple or
        list of texts, JSON-safe claims). The core refuses a success with such an identity
        (``malformed_identity``) rather than answer it with a 500 after auditing a success."""
        if not (type(self.subject) is type(self.username) is type(self.method) is type(self.display_name)
                is type(self.email) is type(self.account_state) is type(self.password_state) is str):
            return "a field that is not text (subject, username, method, display_name, email)"
        groups = self.groups
        if not isinstance(groups, (tuple, list)) or not all(type(group) is str for group in groups):
            return "groups that are not a tuple of texts"
        if not isinstance(self.claims, Mapping):
            return "claims that are not a mapping"
        if self.claims and not _plain_claims(self.claims):
            try:
                json.dumps(dict(self.claims), allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                return "claims that are not JSON"
        if type(self.authenticated_at) not in (int, float):
            return "an authenticated_at that is not a number"
        return ""

    def refusal(self, *, password_state_refuses: bool = False) -> str:
        """The reason code to refuse this identity with (``ACCOUNT_STATE``), or ``""``."""
        return self.account_state or (self.password_state if password_state_refuses else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "username": self.username,
            "display_name": self.display_name,
            "email": self.email,
            "groups": list(self.groups),
            "claims": dict(self.claims),
            "method": self.method,
            "authenticated_at": self.authenticated_at,
        }


@dataclass(frozen=True, slots=True)
class UserPage:
    """One page of a ``gateway_search_users`` answer.

    :ivar users: the matching identities, in a stable order, with their account state set as a
        ``gateway_lookup_user`` answer would (never a password nor a hash in ``claims``).
    :ivar next_cursor: an opaque text to pass back for the next page; ``None`` on the last page.
    """

    users: tuple[Identity, ...]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to an attempt.

    :ivar outcome: what the attempt came to; only ``SUCCESS`` carries an identity.
    :ivar identity: who was proved, on ``SUCCESS``; ``None`` otherwise.
    :ivar reason: a stable machine code (``ldap.locked``, ``kerberos.clock_skew``...), documented
        in docs/reasons.md; empty for a plain success.
    :ivar step: the name of the chain step (or wrapper) that decided.
    :ivar from_cache: the credential cache answered, not the live backend.
    :ivar answered_by: which of the step's backends answered, by the step's own name for it (the
        relay: the id of the connector whose link it sent the request on, never a name the
        answer gives), for the audit line; empty when the step does not say. Several backends
        that vouch alike (a relay's connectors): the audit tells which one vouched. On a cache
        answer (``from_cache``), the backend whose earlier answer it repeats; the cache asks
        ``gateway_answerer_revoked`` before it answers on that backend's word.
    """

    outcome: Outcome
    step: str
    reason: str = ""
    identity: Identity | None = None
    from_cache: bool = False
    answered_by: str = ""

    def __post_init__(self) -> None:
        if (self.outcome is Outcome.SUCCESS) != (self.identity is not None):
            raise ValueError("a Decision has an identity exactly when it is a SUCCESS")

    @property
    def success(self) -> bool:
        return self.outcome is Outcome.SUCCESS

    @classmethod
    def allow(cls, identity: Identity, *, step: str, reason: str = "", from_cache: bool = False,
              answered_by: str = "") -> Decision:
        return cls(Outcome.SUCCESS, step, reason, identity, from_cache, answered_by)

    @classmethod
    def deny(cls, outcome: Outcome, *, step: str, reason: str, answered_by: str = "") -> Decision:
        return cls(outcome, step, reason, answered_by=answered_by)
