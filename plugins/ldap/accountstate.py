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
    mean never.
``ldap.password_expired`` / ``ldap.must_change_password`` (password state only)
    UF_PASSWORD_EXPIRED (0x800000) in the computed attribute; AD ``pwdLastSet: 0`` or ppolicy
    ``pwdReset: TRUE`` (must change at next logon).

A ppolicy lock whose ``pwdLockoutDuration`` has passed stays in the entry until the user's next
password bind; until then it still refuses (fail closed). Reads no settings.
"""

from __future__ import annotations

import time

from gateway.plugins.ldap.link import Entry

__all__ = ["STATE_ATTRIBUTES", "account_state"]

#: Asked for with every user search. A server ignores attributes it does not know (RFC 4511
#: section 4.5.1.8), so one list serves every directory family.
STATE_ATTRIBUTES = ("userAccountControl", "msDS-User-Account-Control-Computed", "accountExpires", "pwdLastSet",
                    "pwdAccountLockedTime", "pwdReset", "nsAccountLock")

ACCOUNTDISABLE = 0x2
UF_LOCKOUT = 0x10
UF_PASSWORD_EXPIRED = 0x800000
_FILETIME_NEVER = (0, 0x7FFFFFFFFFFFFFFF)
_FILETIME_EPOCH = 11644473600  # seconds from 1601-01-01 to 1970-01-01


def _int(entry: Entry, attr: str) -> int | None:
    values = entry.get(attr)
    if not values:
        return None
    text = values[0].decode("ascii", "replace") if isinstance(values[0], (bytes, bytearray)) else values[0]
    try:
        return int(text.strip())
    except ValueError:
        return None


def _true(entry: Entry, attr: str) -> bool:
    values = entry.get(attr)
    return bool(values) and (values[0].decode("utf-8", "replace") if isinstance(values[0], (bytes, bytearray))
                             else values[0]).strip().lower() == "true"


def account_state(entry: Entry, now: float | None = None) -> tuple[str, str]:
    """``(account_state, password_state)`` reason codes of *entry*; empty strings when fine."""
    uac = _int(entry, "userAccountControl") or 0
    computed = _int(entry, "msDS-User-Account-Control-Computed") or 0
    account = ""
    if uac & ACCOUNTDISABLE or _true(entry, "nsAccountLock"):
        account = "ldap.disabled"
    elif (uac | computed) & UF_LOCKOUT or entry.get("pwdAccountLockedTime"):
        account = "ldap.locked"
    else:
        expires = _int(entry, "accountExpires")
        if expires is not None and expires not in _FILETIME_NEVER:
            if (time.time() if now is None else now) >= expires / 10_000_000 - _FILETIME_EPOCH:
                account = "ldap.account_expired"
    password = ""
    if computed & UF_PASSWORD_EXPIRED:
        password = "ldap.password_expired"
    elif _int(entry, "pwdLastSet") == 0 or _true(entry, "pwdReset"):
        password = "ldap.must_change_password"
    return account, password
