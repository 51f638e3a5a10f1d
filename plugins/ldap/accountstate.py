"""Account state read from the user's entry, for logins that bind no password.

A password bind lets the directory judge the account (AD's ``data 533`` sub-codes, ppolicy's
refusal). Kerberos and certificate logins only *look the user up* (``gateway_lookup_user``), so
the state must be read from attributes, or a disabled account keeps logging in with a ticket
obtained before it was disabled, or a certificate that outlives the account by years.

Decides the reason codes the password path uses (:mod:`~gateway.plugins.ldap.adcodes`):

``ldap.disabled``
    AD ``userAccountControl`` ACCOUNTDISABLE (0x2); 389-DS/FreeIPA ``nsAccountLock: TRUE``.
``ldap.locked``
    AD ``msDS-User-Account-Control-Computed`` UF_LOCKOUT (0x10) (a constructed attribute: only
    returned when asked for by name, which the user search does); OpenLDAP ppolicy
    ``pwdAccountLockedTime`` (any value; ``000001010000Z`` is an administrative lock for ever).
``ldap.account_expired``
    AD ``accountExpires`` (FILETIME: 100 ns since 1601) in the past; 0 and 0x7FFFFFFFFFFFFFFF
    mean never. OpenLDAP ppolicy ``pwdEndTime`` passed or ``pwdStartTime`` not reached yet
    (generalized time): slapd refuses every bind outside that window, so it is the account's
    validity period, not the password's age.
``ldap.account_state_unreadable`` (lookups only)
    the preset's directory family always carries an attribute (AD: ``userAccountControl``) and
    the entry came without it: the service account may not read it (see :data:`ALWAYS_PRESENT`).
``ldap.password_expired`` / ``ldap.must_change_password`` (password state only)
    UF_PASSWORD_EXPIRED (0x800000) in the computed attribute; AD ``pwdLastSet: 0`` or ppolicy
    ``pwdReset: TRUE`` (must change at next logon). OpenLDAP ppolicy's expiry is not a flag but
    an age: ``pwdChangedTime`` plus the ``pwdMaxAge`` of the user's policy (an entry of its own,
    named by ``pwdPolicySubentry`` or the overlay's default). :func:`account_state` cannot see the
    policy; the caller reads it (the directory, cached) and asks :func:`password_age_state`, which
    judges as slapd does (``servers/slapd/overlays/ppolicy.c``, slapo-ppolicy(5)): expired when
    ``now - pwdChangedTime > pwdMaxAge``; no ``pwdChangedTime``, or ``pwdMaxAge`` absent or 0,
    never expires. Grace logins (``pwdGraceAuthNLimit``) are not counted: they are password
    binds slapd lets an expired password make so that it can be changed; a login that binds no
    password uses none, and is answered as the password's state is: expired.

A ppolicy lock whose ``pwdLockoutDuration`` has passed stays in the entry until the user's next
password bind; until then it still refuses (fail closed). Every value of an attribute counts (a
multi-valued copy cannot hide a flag behind a harmless first value), and a value that does not
parse refuses with the attribute's reason: a state the gateway cannot read is not a usable
account (fail closed). Reads no settings.
"""

from __future__ import annotations

import datetime as dt
import re
import time

from gateway.plugins.ldap.link import Entry

__all__ = ["ALWAYS_PRESENT", "PPOLICY_AGE_ATTRIBUTES", "STATE_ATTRIBUTES", "account_state", "password_age_state",
           "policy_dn", "policy_max_age"]

#: What :func:`account_state` judges.
_JUDGED = ("userAccountControl", "msDS-User-Account-Control-Computed", "accountExpires", "pwdLastSet",
           "pwdAccountLockedTime", "pwdReset", "nsAccountLock", "pwdStartTime", "pwdEndTime")
#: ppolicy's password age (operational attributes: returned only when asked for by name), judged
#: by :func:`password_age_state` with the policy's ``pwdMaxAge``.
PPOLICY_AGE_ATTRIBUTES = ("pwdChangedTime", "pwdPolicySubentry")
#: Asked for with every user search. A server ignores attributes it does not know (RFC 4511
#: section 4.5.1.8), so one list serves every directory family.
STATE_ATTRIBUTES = _JUDGED + PPOLICY_AGE_ATTRIBUTES

#: State attributes every user entry of a directory family carries (by preset): absent from a
#: lookup's answer, the service account may not read them, and "not disabled" cannot be told
#: from "cannot see" (fail closed, ``ldap.account_state_unreadable``). Other families leave
#: their state attributes out when not set, so nothing can be required of them.
ALWAYS_PRESENT = {"active_directory": ("userAccountControl",)}

#: The same, as :class:`Entry` folds names: an entry with none of them is a usable account.
_STATE_FOLDED = frozenset(name.lower() for name in _JUDGED)

ACCOUNTDISABLE = 0x2
UF_LOCKOUT = 0x10
UF_PASSWORD_EXPIRED = 0x800000
_FILETIME_NEVER = (0, 0x7FFFFFFFFFFFFFFF)
_FILETIME_EPOCH = 11644473600  # seconds from 1601-01-01 to 1970-01-01


#: Stands for a value that is present but does not parse: refuses (fail closed).
_GARBAGE = object()
#: RFC 4517 section 3.3.13: YYYYMMDDHH[MM[SS]][(.|,)fraction](Z|+-HH[MM]).
_GENERALIZED = re.compile(r"(\d{10})(\d{2})?(\d{2})?(?:[.,](\d+))?(Z|[+-]\d{2}(?:\d{2})?)")


def _texts(entry: Entry, attr: str) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
            for v in entry.get(attr) or ()]


def _ints(entry: Entry, attr: str) -> list[int] | object:
    """Every value as an integer; ``_GARBAGE`` when one does not parse."""
    try:
        return [int(text.strip()) for text in _texts(entry, attr)]
    except ValueError:
        return _GARBAGE


def _flags(entry: Entry, attr: str) -> int:
    """The OR of every value's bits; all bits set when a value does not parse."""
    values = _ints(entry, attr)
    if values is _GARBAGE:
        return -1
    result = 0
    for value in values:  # type: ignore[union-attr]
        result |= value
    return result


def _true(entry: Entry, attr: str) -> bool:
    return any(text.strip().lower() == "true" for text in _texts(entry, attr))


def _generalized_time(text: str) -> float | None:
    """Seconds since the epoch of an LDAP generalized time, or None when it does not parse."""
    match = _GENERALIZED.fullmatch(text.strip())
    if match is None:
        return None
    hours, minutes, seconds, fraction, zone = match.groups()
    offset = dt.timedelta(0)
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        offset = sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5] or 0))
    # The fraction is of the last unit written (an hour, a minute or a second).
    unit = 3600 if minutes is None else 60 if seconds is None else 1
    try:
        when = dt.datetime.strptime(hours + (minutes or "00") + (seconds or "00"), "%Y%m%d%H%M%S")
        return ((when.replace(tzinfo=dt.timezone.utc) - offset).timestamp()
                + (float(f"0.{fraction}") * unit if fraction else 0.0))
    except (ValueError, OverflowError):
        return None


def _outside_window(entry: Entry, now: float) -> bool:
    """ppolicy ``pwdStartTime`` not reached or ``pwdEndTime`` passed (unparsable: outside)."""
    for attr, outside in (("pwdStartTime", lambda t: now < t), ("pwdEndTime", lambda t: now >= t)):
        for text in _texts(entry, attr):
            when = _generalized_time(text)
            if when is None or outside(when):
                return True
    return False


def _expired(entry: Entry, now: float) -> bool:
    values = _ints(entry, "accountExpires")
    if values is _GARBAGE:
        return True
    return any(v not in _FILETIME_NEVER and now >= v / 10_000_000 - _FILETIME_EPOCH
               for v in values)  # type: ignore[union-attr]


def account_state(entry: Entry, now: float | None = None) -> tuple[str, str]:
    """``(account_state, password_state)`` reason codes of *entry*; empty strings when fine."""
    if _STATE_FOLDED.isdisjoint(entry.folded):
        # No state attribute at all (an OpenLDAP user without ppolicy state, most logins there):
        # every test below would find nothing, at some forty calls per login.
        return "", ""
    now = time.time() if now is None else now
    uac = _flags(entry, "userAccountControl")
    computed = _flags(entry, "msDS-User-Account-Control-Computed")
    account = ""
    if uac & ACCOUNTDISABLE or _true(entry, "nsAccountLock"):
        account = "ldap.disabled"
    elif (uac | computed) & UF_LOCKOUT or entry.get("pwdAccountLockedTime"):
        account = "ldap.locked"
    elif _expired(entry, now) or _outside_window(entry, now):
        account = "ldap.account_expired"
    password = ""
    last_set = _ints(entry, "pwdLastSet")
    if computed & UF_PASSWORD_EXPIRED:
        password = "ldap.password_expired"
    elif last_set is _GARBAGE or 0 in last_set or _true(entry, "pwdReset"):  # type: ignore[operator]
        password = "ldap.must_change_password"
    return account, password


def policy_dn(entry: Entry) -> str | None:
    """The DN in the user's ``pwdPolicySubentry`` (single-valued in slapd's schema: the first
    value), or None: the overlay's default policy applies then."""
    texts = [text.strip() for text in _texts(entry, "pwdPolicySubentry")]
    return next((text for text in texts if text), None)


def policy_max_age(policy: Entry) -> int | None:
    """``pwdMaxAge`` of a ppolicy entry in seconds: 0 when absent (never expires); None when a
    value does not parse (fail closed: :func:`password_age_state` counts it as expired)."""
    values = _ints(policy, "pwdMaxAge")
    if values is _GARBAGE:
        return None
    return values[0] if values else 0  # type: ignore[index]


def password_age_state(entry: Entry, max_age: int | None, now: float | None = None) -> str:
    """``ldap.password_expired`` when the entry's ``pwdChangedTime`` is older than *max_age*
    seconds (the policy's ``pwdMaxAge``; None: it did not parse), else ``""``.

    As slapd judges a bind: ``pwdMaxAge`` 0 never expires, an entry without ``pwdChangedTime``
    never expires, and the password expires once ``now - pwdChangedTime > pwdMaxAge``. A
    ``pwdChangedTime`` (or ``pwdMaxAge``) that does not parse refuses (fail closed)."""
    texts = _texts(entry, "pwdChangedTime")
    if not texts or max_age == 0:
        return ""
    if max_age is None:
        return "ldap.password_expired"
    now = time.time() if now is None else now
    for text in texts:
        changed = _generalized_time(text)
        if changed is None or now - changed > max_age:
            return "ldap.password_expired"
    return ""
